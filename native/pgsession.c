/*
 * Session tracking in C; see pgsession.h and haproxy_ln/pgwire/session.py.
 */
#include "pgsession.h"

#include <string.h>

#define G_START 3
#define G_UNKNOWN 3
#define G_COMMITS 4
#define G_TXN 8
#define G_EXECUTES 16
#define G_CLOSED 32
#define G_TRIGGERED 64
#define G_ARMED 128

void pgs_init(pgs_session *s)
{
    memset(s, 0, sizeof *s);
    s->status = 'I';
}

/* ---- SQL classification (sql.classify) ----------------------------------- */

static int is_word(uint8_t c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static uint8_t lower(uint8_t c)
{
    return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

static int word_is(const uint8_t *w, size_t n, const char *kw)
{
    size_t k = strlen(kw);
    if (n != k)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (lower(w[i]) != (uint8_t)kw[i])
            return 0;
    return 1;
}

static int contains(const uint8_t *text, size_t len, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= len; i++) {
        size_t j = 0;
        while (j < k && lower(text[i + j]) == (uint8_t)needle[j])
            j++;
        if (j == k)
            return 1;
    }
    return 0;
}

int pgs_classify(const uint8_t *text, size_t len)
{
    int flags = 0;
    for (size_t i = 0; i < len;) {
        if (!is_word(text[i])) {
            i++;
            continue;
        }
        size_t start = i;
        while (i < len && is_word(text[i]))
            i++;
        const uint8_t *w = text + start;
        size_t n = i - start;
        if (word_is(w, n, "commit") || word_is(w, n, "end") || word_is(w, n, "prepare"))
            flags |= PGS_COMMITS | PGS_TXN_CONTROL;
        else if (word_is(w, n, "begin") || word_is(w, n, "start") || word_is(w, n, "rollback") ||
                 word_is(w, n, "abort"))
            flags |= PGS_TXN_CONTROL;
    }
    if (contains(text, len, "synchronous_commit") || contains(text, len, "pg_settings"))
        flags |= PGS_MENTIONS;
    return flags;
}

/* ---- message fields (messages.name_at / cstring) ------------------------- */

/* Offset after the name starting at `start`, or -1 if it is malformed. */
static long name_end(const uint8_t *msg, size_t len, size_t start)
{
    size_t limit = start + PGS_MAX_NAME_FIELD + 1;
    for (size_t i = start; i < len && i < limit; i++)
        if (msg[i] == 0)
            return (long)i + 1;
    return -1;
}

static long field_end(const uint8_t *msg, size_t len, size_t start)
{
    const uint8_t *nul = start < len ? memchr(msg + start, 0, len - start) : NULL;
    return nul ? nul - msg + 1 : -1;
}

/* ---- names ------------------------------------------------------------------ */

static int flags_of(const pgs_session *s, const pgs_name *table, int n, const uint8_t *name,
                    size_t len)
{
    if (len && s->overflow)
        return PGS_COMMITS | PGS_TXN_CONTROL;
    for (int i = 0; i < n; i++)
        if (table[i].len == len && memcmp(table[i].name, name, len) == 0)
            return table[i].flags;
    return 0;
}

static void remember(pgs_session *s, pgs_name *table, uint8_t *n, const uint8_t *name, size_t len,
                     int flags)
{
    flags &= PGS_COMMITS | PGS_TXN_CONTROL;
    int found = -1;
    for (int i = 0; i < *n; i++)
        if (table[i].len == len && memcmp(table[i].name, name, len) == 0)
            found = i;
    if (!flags) {
        if (found >= 0)
            table[found] = table[--*n];
    } else if (found >= 0) {
        table[found].flags = (uint8_t)flags;
    } else if (*n < PGS_MAX_NAMES && len <= PGS_MAX_NAME) {
        table[*n].len = (uint8_t)len;
        table[*n].flags = (uint8_t)flags;
        memcpy(table[*n].name, name, len);
        ++*n;
    } else {
        s->overflow = 1;
        *n = 0;
    }
}

static void forget(pgs_name *table, uint8_t *n, const uint8_t *name, size_t len)
{
    for (int i = 0; i < *n; i++) {
        if (table[i].len == len && memcmp(table[i].name, name, len) == 0) {
            table[i] = table[--*n];
            return;
        }
    }
}

/* ---- groups ----------------------------------------------------------------- */

static uint8_t *group_at(pgs_session *s, uint32_t i)
{
    return &s->groups[(s->head + i) % PGS_MAX_IN_FLIGHT];
}

static int could_commit(uint8_t g)
{
    if (g & G_COMMITS)
        return 1;
    int start = g & G_START;
    return (g & G_EXECUTES) && start != 1 && start != 2;
}

static uint8_t *new_group(pgs_session *s, int flags)
{
    int known = 1;
    for (uint32_t i = 0; i < s->count; i++)
        if (*group_at(s, i) & G_TXN)
            known = 0;
    int start = !known ? G_UNKNOWN : s->status == 'T' ? 1 : s->status == 'E' ? 2 : 0;
    uint8_t *g = group_at(s, s->count++);
    *g = (uint8_t)(start | ((flags & PGS_COMMITS) ? G_COMMITS : 0) |
                   ((flags & PGS_TXN_CONTROL) ? G_TXN : 0));
    return g;
}

static uint8_t *open_group(pgs_session *s)
{
    if (s->count && !(*group_at(s, s->count - 1) & G_CLOSED))
        return group_at(s, s->count - 1);
    return new_group(s, 0);
}

static uint8_t as_group_flags(int flags)
{
    return (uint8_t)(((flags & PGS_COMMITS) ? G_COMMITS : 0) |
                     ((flags & PGS_TXN_CONTROL) ? G_TXN : 0));
}

/* ---- client messages -------------------------------------------------------- */

int pgs_client(pgs_session *s, const uint8_t *msg, size_t len, int checked)
{
    uint8_t t = msg[0];
    if (t == 'Q') {
        if (msg[len - 1] != 0)
            return PGS_ERR_QUERY;
        int flags = pgs_classify(msg + 5, len - 6);
        if ((flags & PGS_MENTIONS) && !checked)
            return PGS_CHECK;
        uint8_t *g = new_group(s, flags);
        *g |= G_EXECUTES | G_CLOSED | G_TRIGGERED;
    } else if (t == 'P') {
        long i = name_end(msg, len, 5);
        if (i < 0)
            return PGS_ERR_NAME;
        long e = field_end(msg, len, (size_t)i);
        if (e < 0)
            return PGS_ERR_FIELD;
        int flags = pgs_classify(msg + i, (size_t)(e - 1 - i));
        if ((flags & PGS_MENTIONS) && !checked)
            return PGS_CHECK;
        remember(s, s->statements, &s->n_statements, msg + 5, (size_t)(i - 1 - 5), flags);
        open_group(s);
    } else if (t == 'B') {
        long i = name_end(msg, len, 5);
        long j = i < 0 ? -1 : name_end(msg, len, (size_t)i);
        if (j < 0)
            return PGS_ERR_NAME;
        int flags = flags_of(s, s->statements, s->n_statements, msg + i, (size_t)(j - 1 - i));
        remember(s, s->portals, &s->n_portals, msg + 5, (size_t)(i - 1 - 5), flags);
        open_group(s);
    } else if (t == 'E') {
        long i = name_end(msg, len, 5);
        if (i < 0)
            return PGS_ERR_NAME;
        uint8_t *g = open_group(s);
        *g |= G_EXECUTES |
              as_group_flags(flags_of(s, s->portals, s->n_portals, msg + 5, (size_t)(i - 1 - 5)));
        if (*g & G_COMMITS)
            *g |= G_TRIGGERED;
    } else if (t == 'F') {
        *open_group(s) |= G_EXECUTES | G_TXN;
    } else if (t == 'S') {
        *open_group(s) |= G_CLOSED | G_TRIGGERED;
    } else if (t == 'C') {
        if (len < 7)
            return PGS_ERR_CLOSE;
        uint8_t kind = msg[5];
        long i = name_end(msg, len, 6);
        if (i < 0)
            return PGS_ERR_NAME;
        if (kind == 'S') {
            forget(s->statements, &s->n_statements, msg + 6, (size_t)(i - 1 - 6));
        } else if (kind == 'P') {
            forget(s->portals, &s->n_portals, msg + 6, (size_t)(i - 1 - 6));
        } else {
            s->err_value = kind;
            return PGS_ERR_CLOSE_KIND;
        }
    } else if (t == 'c' || t == 'f') {
        s->copy_in = 0;
    } else if (t == 'X') {
        s->terminated = 1;
    }
    return PGS_OK;
}

/* ---- server messages ---------------------------------------------------------- */

int pgs_server(pgs_session *s, const uint8_t *msg, size_t len)
{
    uint8_t t = msg[0];
    if (t == 'Z') {
        if (len != 6 || (msg[5] != 'I' && msg[5] != 'T' && msg[5] != 'E'))
            return PGS_ERR_RFQ;
        s->status = msg[5];
        s->ready = 1;
        s->copy_in = 0;
        s->answered++;
        if (s->count && (*group_at(s, 0) & G_CLOSED)) {
            s->head = (s->head + 1) % PGS_MAX_IN_FLIGHT;
            s->count--;
        }
    } else if (t == 'K') {
        return PGS_CHECK;
    } else if (t == 'G' || t == 'W') {
        s->copy_in = 1;
    }
    return PGS_OK;
}

void pgs_flushed(pgs_session *s)
{
    for (uint32_t i = 0; i < s->count; i++) {
        uint8_t *g = group_at(s, i);
        if (*g & G_TRIGGERED)
            *g |= G_ARMED;
    }
}

int pgs_cancel_is_safe(const pgs_session *s)
{
    for (uint32_t i = 0; i < s->count; i++)
        if (could_commit(s->groups[(s->head + i) % PGS_MAX_IN_FLIGHT]))
            return 0;
    return 1;
}

int pgs_must_keep_backend(const pgs_session *s)
{
    if (s->copy_in)
        return 0;
    for (uint32_t i = 0; i < s->count; i++) {
        uint8_t g = s->groups[(s->head + i) % PGS_MAX_IN_FLIGHT];
        if ((g & G_ARMED) && could_commit(g))
            return 1;
    }
    return 0;
}
