/*
 * PostgreSQL wire framing over pooled, reused buffers.
 *
 * How this works: a framer owns at most one buffer, taken from a pool when
 * bytes arrive and given back as soon as everything received has been sent
 * on, so an idle connection holds no buffer and a busy one reuses the same
 * few.  Bytes are scanned in place.  Messages whose type is marked "hold"
 * in the type table are delivered whole (the caller inspects them, then
 * accepts or drops them); every other message is streamed: its bytes join
 * the send window as soon as they arrive, so a 1 GB DataRow never needs a
 * 1 GB buffer.  The buffer layout is
 *
 *     [0, snd)      free (already sent)
 *     [snd, rd)     the send window: scanned and accepted, not yet sent
 *     [rd, wr)      received, not yet scanned (a partial header, or a held
 *                   message still arriving)
 *     [wr, cap)     free for the next recv
 *
 * Declared lengths are never trusted: a length below 4, above the
 * configured limit, or a type byte outside the table is a sticky protocol
 * error, and no buffer grows beyond what one held message within the limit
 * needs.  The pool has a byte budget shared by all framers using it; sizes up
 * to 64 chunks are rounded to a power of two and cached for reuse, larger
 * ones are allocated to the chunk-rounded size and freed after use.
 */
#ifndef PGFRAME_H
#define PGFRAME_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define PGF_MORE (-1)        /* next(): no complete event; recv(): would block */
#define PGF_ERR_SHORT (-2)   /* length field below 4 */
#define PGF_ERR_LONG (-3)    /* length field above max_message */
#define PGF_ERR_TYPE (-4)    /* type byte not allowed in this direction */
#define PGF_ERR_STARTUP (-5) /* untyped message length outside 8..10000 */
#define PGF_ERR_NOMEM (-6)   /* the pool's byte budget is exhausted */
#define PGF_ERR_STATE (-7)   /* API misuse by the caller */
#define PGF_ERR_IO (-8)      /* recv/send failed; errno in err_value */

#define PGF_ALLOW 1 /* type table flag: the type may appear */
#define PGF_HOLD 2  /* type table flag: deliver the message whole */

#define PGF_UNTYPED_MIN 8
#define PGF_UNTYPED_MAX 10000 /* PostgreSQL's MAX_STARTUP_PACKET_LENGTH */
#define PGF_CLASSES 7 /* pooled sizes: chunk << 0 .. chunk << 6; larger are exact */

typedef struct pgf_pool {
    size_t chunk;    /* smallest buffer, a power of two */
    size_t budget;   /* cap on bytes handed out plus bytes cached */
    size_t keep;     /* cap on bytes cached in the free lists */
    size_t in_use;   /* bytes handed out now */
    size_t cached;   /* bytes in the free lists now */
    uint64_t mallocs; /* buffers ever allocated from the system */
    void *free_list[PGF_CLASSES];
    pthread_mutex_t mu; /* Python's thread and the relay thread share a pool */
} pgf_pool;

typedef struct pgf_framer {
    pgf_pool *pool;
    uint8_t *buf;
    size_t cap;
    size_t snd, rd, wr;
    uint64_t stream_left; /* body bytes of the streamed message still to come */
    uint32_t max_message;
    int untyped;          /* the next message has no type byte */
    int error;            /* sticky protocol error, 0 if none */
    int64_t err_value;    /* the offending length, type byte or errno */
    int msg_type;         /* held message returned by next(), or -1 */
    size_t msg_off, msg_len;
    const uint8_t *table; /* 256 flag bytes, owned by the caller */
} pgf_framer;

void pgf_pool_init(pgf_pool *p, size_t chunk, size_t budget, size_t keep);
void pgf_pool_clear(pgf_pool *p);

void pgf_init(pgf_framer *f, pgf_pool *p, const uint8_t *table, uint32_t max_message,
              int untyped);
void pgf_close(pgf_framer *f);

ssize_t pgf_recv(pgf_framer *f, int fd);
int pgf_next(pgf_framer *f);
int pgf_accept(pgf_framer *f);
int pgf_drop(pgf_framer *f);
ssize_t pgf_send(pgf_framer *f, int fd);
void pgf_discard(pgf_framer *f);
int pgf_at_boundary(const pgf_framer *f);
void pgf_expect_untyped(pgf_framer *f);

#endif
