/*
 * PostgreSQL wire framing over pooled, reused buffers.  See pgframe.h for
 * the buffer layout; haproxy_ln/framing/pure.py is the line-by-line twin
 * and the tests require both to behave identically.
 */
#include "pgframe.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* ---- pool ---------------------------------------------------------------- */

void pgf_pool_init(pgf_pool *p, size_t chunk, size_t budget, size_t keep)
{
    memset(p, 0, sizeof *p);
    p->chunk = chunk;
    p->budget = budget;
    p->keep = keep;
    pthread_mutex_init(&p->mu, NULL);
}

/* The free list for `need` bytes and the size to allocate; -1: not pooled. */
static int size_class(const pgf_pool *p, size_t need, size_t *size)
{
    size_t s = p->chunk;
    for (int c = 0; c < PGF_CLASSES; c++, s <<= 1) {
        if (s >= need) {
            *size = s;
            return c;
        }
    }
    *size = (need + p->chunk - 1) / p->chunk * p->chunk;
    return -1;
}

static void drop_cached(pgf_pool *p)
{
    for (int c = 0; c < PGF_CLASSES; c++) {
        while (p->free_list[c]) {
            void *b = p->free_list[c];
            p->free_list[c] = *(void **)b;
            free(b);
        }
    }
    p->cached = 0;
}

void pgf_pool_clear(pgf_pool *p)
{
    pthread_mutex_lock(&p->mu);
    drop_cached(p);
    pthread_mutex_unlock(&p->mu);
}

static uint8_t *pool_take_locked(pgf_pool *p, size_t need, size_t *cap)
{
    size_t size;
    int c = size_class(p, need, &size);
    void *b = c >= 0 ? p->free_list[c] : NULL;
    if (b) {
        p->free_list[c] = *(void **)b;
        p->cached -= size;
        p->in_use += size;
        *cap = size;
        return b;
    }
    if (p->in_use + p->cached + size > p->budget)
        drop_cached(p);
    if (p->in_use + size > p->budget)
        return NULL;
    b = malloc(size);
    if (!b)
        return NULL;
    p->mallocs++;
    p->in_use += size;
    *cap = size;
    return b;
}

static uint8_t *pool_take(pgf_pool *p, size_t need, size_t *cap)
{
    pthread_mutex_lock(&p->mu);
    uint8_t *b = pool_take_locked(p, need, cap);
    pthread_mutex_unlock(&p->mu);
    return b;
}

static void pool_give(pgf_pool *p, uint8_t *b, size_t cap)
{
    pthread_mutex_lock(&p->mu);
    size_t size;
    int c = size_class(p, cap, &size);
    p->in_use -= cap;
    if (c >= 0 && p->cached + cap <= p->keep) {
        *(void **)b = p->free_list[c];
        p->free_list[c] = b;
        p->cached += cap;
    } else {
        free(b);
    }
    pthread_mutex_unlock(&p->mu);
}

/* ---- framer -------------------------------------------------------------- */

void pgf_init(pgf_framer *f, pgf_pool *p, const uint8_t *table, uint32_t max_message,
              int untyped)
{
    memset(f, 0, sizeof *f);
    f->pool = p;
    f->table = table;
    f->max_message = max_message;
    f->untyped = untyped;
    f->msg_type = -1;
}

static void release(pgf_framer *f)
{
    if (f->buf)
        pool_give(f->pool, f->buf, f->cap);
    f->buf = NULL;
    f->cap = f->snd = f->rd = f->wr = 0;
}

static void release_if_empty(pgf_framer *f)
{
    if (f->buf && f->snd == f->wr)
        release(f);
}

void pgf_close(pgf_framer *f)
{
    release(f);
    f->msg_type = -1;
}

static int fail(pgf_framer *f, int code, int64_t value)
{
    f->error = code;
    f->err_value = value;
    return code;
}

static void compact(pgf_framer *f)
{
    memmove(f->buf, f->buf + f->snd, f->wr - f->snd);
    f->rd -= f->snd;
    f->wr -= f->snd;
    f->snd = 0;
}

/* Make room for `need` bytes starting at rd, keeping [snd, wr). */
static int ensure(pgf_framer *f, size_t need)
{
    if (f->buf && f->rd + need <= f->cap)
        return 0;
    size_t total = f->rd - f->snd + need;
    if (f->buf && total <= f->cap) {
        compact(f);
        return 0;
    }
    size_t cap;
    uint8_t *nb = pool_take(f->pool, total, &cap);
    if (!nb)
        return fail(f, PGF_ERR_NOMEM, (int64_t)total);
    if (f->buf) {
        memcpy(nb, f->buf + f->snd, f->wr - f->snd);
        pool_give(f->pool, f->buf, f->cap);
    }
    f->rd -= f->snd;
    f->wr -= f->snd;
    f->snd = 0;
    f->buf = nb;
    f->cap = cap;
    return 0;
}

ssize_t pgf_recv(pgf_framer *f, int fd)
{
    if (f->error)
        return f->error;
    if (f->msg_type >= 0)
        return PGF_ERR_STATE;
    if (!f->buf) {
        if (ensure(f, 1))
            return f->error;
    } else if (f->snd > 0) {
        compact(f);
    }
    if (f->wr == f->cap)
        return PGF_ERR_STATE;
    ssize_t n;
    do
        n = recv(fd, f->buf + f->wr, f->cap - f->wr, 0);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        f->wr += (size_t)n;
        return n;
    }
    int err = errno;
    release_if_empty(f);
    if (n == 0)
        return 0;
    if (err == EAGAIN || err == EWOULDBLOCK)
        return PGF_MORE;
    f->err_value = err;
    return PGF_ERR_IO;
}

int pgf_next(pgf_framer *f)
{
    if (f->error)
        return f->error;
    if (f->msg_type >= 0)
        return PGF_ERR_STATE;
    for (;;) {
        if (f->stream_left) {
            size_t take = f->wr - f->rd;
            if (take > f->stream_left)
                take = (size_t)f->stream_left;
            f->rd += take;
            f->stream_left -= take;
            if (f->stream_left)
                return PGF_MORE;
        }
        size_t avail = f->wr - f->rd;
        const uint8_t *p = f->buf ? f->buf + f->rd : NULL;
        size_t total;
        int type;
        if (f->untyped) {
            if (avail < 4)
                return PGF_MORE;
            uint32_t len = be32(p);
            if (len < PGF_UNTYPED_MIN || len > PGF_UNTYPED_MAX)
                return fail(f, PGF_ERR_STARTUP, len);
            total = len;
            type = 0;
        } else {
            if (avail < 1)
                return PGF_MORE;
            type = p[0];
            if (!(f->table[type] & PGF_ALLOW))
                return fail(f, PGF_ERR_TYPE, type);
            if (avail < 5)
                return PGF_MORE;
            uint32_t len = be32(p + 1);
            if (len < 4)
                return fail(f, PGF_ERR_SHORT, len);
            if (len > f->max_message)
                return fail(f, PGF_ERR_LONG, len);
            if (!(f->table[type] & PGF_HOLD)) {
                f->rd += 5;
                f->stream_left = len - 4;
                continue;
            }
            total = (size_t)len + 1;
        }
        if (ensure(f, total))
            return f->error;
        if (f->wr - f->rd < total)
            return PGF_MORE;
        f->untyped = 0;
        f->msg_type = type;
        f->msg_off = f->rd;
        f->msg_len = total;
        return type;
    }
}

int pgf_accept(pgf_framer *f)
{
    if (f->msg_type < 0)
        return PGF_ERR_STATE;
    f->rd += f->msg_len;
    f->msg_type = -1;
    return 0;
}

int pgf_drop(pgf_framer *f)
{
    if (f->msg_type < 0 || f->snd != f->rd)
        return PGF_ERR_STATE;
    f->rd += f->msg_len;
    f->snd = f->rd;
    f->msg_type = -1;
    release_if_empty(f);
    return 0;
}

ssize_t pgf_send(pgf_framer *f, int fd)
{
    while (f->snd < f->rd) {
        ssize_t n = send(fd, f->buf + f->snd, f->rd - f->snd, MSG_NOSIGNAL);
        if (n > 0) {
            f->snd += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return (ssize_t)(f->rd - f->snd);
        } else {
            f->err_value = n < 0 ? errno : 0;
            return PGF_ERR_IO;
        }
    }
    release_if_empty(f);
    return 0;
}

void pgf_discard(pgf_framer *f)
{
    f->snd = f->rd;
    release_if_empty(f);
}

int pgf_at_boundary(const pgf_framer *f)
{
    return f->snd == f->rd && f->stream_left == 0;
}

void pgf_expect_untyped(pgf_framer *f)
{
    f->untyped = 1;
}
