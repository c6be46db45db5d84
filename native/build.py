"""cffi build script (API mode, out of line) for haproxy_ln._native.

`pip install .` runs it through setup.py's cffi_modules; the declarations
below mirror native/pgframe.h, pgsession.h and pgrelay.h.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define PGF_MORE ...
    #define PGF_ERR_SHORT ...
    #define PGF_ERR_LONG ...
    #define PGF_ERR_TYPE ...
    #define PGF_ERR_STARTUP ...
    #define PGF_ERR_NOMEM ...
    #define PGF_ERR_STATE ...
    #define PGF_ERR_IO ...
    #define PGF_UNTYPED_MIN ...
    #define PGF_UNTYPED_MAX ...

    typedef struct pgf_pool {
        size_t chunk; size_t budget; size_t keep;
        size_t in_use; size_t cached; uint64_t mallocs;
        ...;
    } pgf_pool;

    typedef struct pgf_framer {
        size_t snd; size_t rd; size_t wr; size_t cap;
        uint64_t stream_left;
        int untyped; int error; int64_t err_value;
        int msg_type; size_t msg_off; size_t msg_len;
        uint8_t *buf;
        ...;
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

    #define PGS_MAX_IN_FLIGHT ...
    #define PGS_MAX_NAMES ...
    #define PGS_MAX_NAME ...
    #define PGS_OK ...
    #define PGS_CHECK ...
    #define PGS_ERR_QUERY ...
    #define PGS_ERR_NAME ...
    #define PGS_ERR_FIELD ...
    #define PGS_ERR_CLOSE ...
    #define PGS_ERR_CLOSE_KIND ...
    #define PGS_ERR_RFQ ...

    typedef struct pgs_name { uint8_t len; uint8_t flags; char name[]; ...; } pgs_name;
    typedef struct pgs_session {
        uint8_t status; uint8_t ready; uint8_t copy_in; uint8_t terminated; uint8_t overflow;
        uint8_t n_statements; uint8_t n_portals;
        int err_value;
        uint64_t answered;
        uint32_t head; uint32_t count;
        uint8_t groups[];
        pgs_name statements[];
        pgs_name portals[];
        ...;
    } pgs_session;

    void pgs_init(pgs_session *s);
    int pgs_classify(const uint8_t *text, size_t len);
    int pgs_client(pgs_session *s, const uint8_t *msg, size_t len, int checked);
    int pgs_server(pgs_session *s, const uint8_t *msg, size_t len);
    void pgs_flushed(pgs_session *s);
    int pgs_cancel_is_safe(const pgs_session *s);
    int pgs_must_keep_backend(const pgs_session *s);

    #define PGR_EOF ...
    #define PGR_ERROR ...
    #define PGR_ESCALATE ...
    #define PGR_REQUESTED ...

    typedef struct pgr_conn { int reason; ...; } pgr_conn;
    typedef struct pgr_relay { int notify_fd; uint64_t relayed[2]; ...; } pgr_relay;

    int pgr_start(pgr_relay *r);
    void pgr_stop(pgr_relay *r);
    void pgr_attach(pgr_relay *r, pgr_conn *c, int client_fd, int server_fd,
                    pgf_framer *to_server, pgf_framer *to_client, pgs_session *session);
    void pgr_detach(pgr_relay *r, pgr_conn *c);
    int pgr_take(pgr_relay *r, pgr_conn **out, int max);
    """
)
ffibuilder.set_source(
    "haproxy_ln._native",
    '#include "pgframe.h"\n#include "pgsession.h"\n#include "pgrelay.h"',
    sources=[
        str((HERE / name).relative_to(HERE.parent))
        for name in ("pgframe.c", "pgsession.c", "pgrelay.c")
    ],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=[
        "-O2",
        "-std=c11",
        "-D_GNU_SOURCE",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pthread",
    ],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
