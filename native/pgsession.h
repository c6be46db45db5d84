/*
 * Per-connection session state: the C twin of haproxy_ln/pgwire/session.py.
 *
 * How this works: exactly as the Python module describes (read it first);
 * this file only packs the same state into fixed-size memory so that the
 * relay thread can run it without the GIL.  A request group is one byte:
 *
 *     bits 0-1  transaction status when it starts: 0 I, 1 T, 2 E, 3 unknown
 *     bit 2     COMMITS      bit 3  TXN_CONTROL   bit 4  EXECUTES
 *     bit 5     CLOSED       bit 6  TRIGGERED     bit 7  ARMED
 *
 * Statement and portal names whose text may commit are kept in two small
 * tables; the limits equal the Python module's, and the tests drive both
 * with the same messages and require the same state after every one.
 */
#ifndef PGSESSION_H
#define PGSESSION_H

#include <stddef.h>
#include <stdint.h>

#define PGS_MAX_IN_FLIGHT 64
#define PGS_MAX_NAMES 16
#define PGS_MAX_NAME 63
#define PGS_MAX_NAME_FIELD 1024 /* longer statement/portal names are malformed */

#define PGS_COMMITS 1
#define PGS_TXN_CONTROL 2
#define PGS_MENTIONS 4

/* Results of pgs_client / pgs_server. */
#define PGS_OK 0
#define PGS_CHECK 1 /* needs Python: synchronous_commit guard, or BackendKeyData */
#define PGS_ERR_QUERY (-1)      /* Query not zero-terminated */
#define PGS_ERR_NAME (-2)       /* statement/portal name unterminated or too long */
#define PGS_ERR_FIELD (-3)      /* a string field is not zero-terminated */
#define PGS_ERR_CLOSE (-4)      /* Close message too short */
#define PGS_ERR_CLOSE_KIND (-5) /* Close names an unknown kind (in err_value) */
#define PGS_ERR_RFQ (-6)        /* malformed ReadyForQuery */

typedef struct pgs_name {
    uint8_t len;
    uint8_t flags;
    char name[PGS_MAX_NAME];
} pgs_name;

typedef struct pgs_session {
    uint8_t status; /* 'I', 'T' or 'E' */
    uint8_t ready, copy_in, terminated, overflow;
    uint8_t n_statements, n_portals;
    int err_value;
    uint64_t answered;
    uint32_t head, count;
    uint8_t groups[PGS_MAX_IN_FLIGHT];
    pgs_name statements[PGS_MAX_NAMES];
    pgs_name portals[PGS_MAX_NAMES];
} pgs_session;

void pgs_init(pgs_session *s);
int pgs_classify(const uint8_t *text, size_t len);
int pgs_client(pgs_session *s, const uint8_t *msg, size_t len, int checked);
int pgs_server(pgs_session *s, const uint8_t *msg, size_t len);
void pgs_flushed(pgs_session *s);
int pgs_cancel_is_safe(const pgs_session *s);
int pgs_must_keep_backend(const pgs_session *s);

#endif
