"""cffi build script (API mode, out of line) for haproxy_ln._native.

`pip install .` runs it through setup.py's cffi_modules; the declarations
below mirror native/pgframe.h.
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
    """
)
ffibuilder.set_source(
    "haproxy_ln._native",
    '#include "pgframe.h"',
    sources=[str((HERE / "pgframe.c").relative_to(HERE.parent))],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
