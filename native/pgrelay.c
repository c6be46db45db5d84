/*
 * The relay thread; see pgrelay.h.  Direction d reads socket fds[d] through
 * framers[d] and writes socket fds[1 - d]: d = 0 is client to server.
 */
#include "pgrelay.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define BATCH 64

static void notify(int fd)
{
    uint64_t one = 1;
    ssize_t n = write(fd, &one, sizeof one);
    (void)n; /* an eventfd only refuses when its counter is saturated: already signalled */
}

/* ---- one connection ------------------------------------------------------- */

static void set_interest(pgr_conn *c)
{
    for (int side = 0; side < 2; side++) {
        uint32_t want = 0;
        if (!c->blocked[side] && !(side == 0 && c->paused))
            want |= EPOLLIN;
        if (c->blocked[1 - side])
            want |= EPOLLOUT;
        if (want != c->interest[side]) {
            struct epoll_event ev = {.events = want, .data.ptr = &c->ends[side]};
            epoll_ctl(c->relay->epfd, EPOLL_CTL_MOD, c->fds[side], &ev);
            c->interest[side] = want;
        }
    }
}

/* Track and send on what direction d holds; 0 or a handback reason. */
static int forward(pgr_conn *c, int d)
{
    pgf_framer *f = c->framers[d];
    if (c->blocked[d])
        return 0;
    for (;;) {
        if (d == 0 && c->session->count >= PGS_MAX_IN_FLIGHT) {
            c->paused = 1;
            break;
        }
        int t = pgf_next(f);
        if (t == PGF_MORE)
            break;
        if (t < 0)
            return PGR_ERROR;
        const uint8_t *m = f->buf + f->msg_off;
        int r = d ? pgs_server(c->session, m, f->msg_len)
                  : pgs_client(c->session, m, f->msg_len, 0);
        if (r != PGS_OK) {
            f->msg_type = -1; /* unconsumed: Python's pump gets it again */
            return PGR_ESCALATE;
        }
        pgf_accept(f);
    }
    ssize_t rem = pgf_send(f, c->fds[1 - d]);
    if (rem < 0)
        return PGR_ERROR;
    if (rem > 0) {
        c->blocked[d] = 1;
        return 0;
    }
    if (d == 0)
        pgs_flushed(c->session);
    if (d == 1 && c->paused && c->session->count < PGS_MAX_IN_FLIGHT) {
        c->paused = 0;
        return forward(c, 0);
    }
    return 0;
}

static int on_event(pgr_conn *c, int side, uint32_t events)
{
    if (events & EPOLLERR)
        return PGR_ERROR;
    if ((events & EPOLLOUT) && c->blocked[1 - side]) {
        int d = 1 - side;
        ssize_t rem = pgf_send(c->framers[d], c->fds[side]);
        if (rem < 0)
            return PGR_ERROR;
        if (rem == 0) {
            c->blocked[d] = 0;
            if (d == 0)
                pgs_flushed(c->session);
            int r = forward(c, d);
            if (r)
                return r;
        }
    }
    if ((events & (EPOLLIN | EPOLLHUP)) && !c->blocked[side] && !(side == 0 && c->paused)) {
        ssize_t n = pgf_recv(c->framers[side], c->fds[side]);
        if (n == 0)
            return PGR_EOF;
        if (n < 0 && n != PGF_MORE)
            return PGR_ERROR;
        if (n > 0) {
            __atomic_fetch_add(&c->relay->relayed[side], (uint64_t)n, __ATOMIC_RELAXED);
            return forward(c, side);
        }
    } else if (events & EPOLLHUP) {
        return PGR_EOF; /* cannot read now, and nothing will ever be written */
    }
    return 0;
}

/* ---- the thread -------------------------------------------------------------- */

static void hand_back(pgr_relay *r, pgr_conn *c, int reason, pgr_conn **done)
{
    epoll_ctl(r->epfd, EPOLL_CTL_DEL, c->fds[0], NULL);
    epoll_ctl(r->epfd, EPOLL_CTL_DEL, c->fds[1], NULL);
    c->attached = 0;
    c->reason = reason;
    c->next_handback = *done;
    *done = c;
}

static void start_relaying(pgr_relay *r, pgr_conn *c, pgr_conn **done)
{
    for (int side = 0; side < 2; side++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &c->ends[side]};
        if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, c->fds[side], &ev) < 0) {
            if (side == 1)
                epoll_ctl(r->epfd, EPOLL_CTL_DEL, c->fds[0], NULL);
            c->reason = PGR_ERROR;
            c->next_handback = *done;
            *done = c;
            return;
        }
        c->interest[side] = EPOLLIN;
    }
    c->attached = 1;
    /* Whatever Python left buffered or unsent is moved on now: no event will. */
    int reason = forward(c, 0);
    if (!reason)
        reason = forward(c, 1);
    if (reason)
        hand_back(r, c, reason, done);
    else
        set_interest(c);
}

/* Run queued commands and publish handbacks; returns r->stop.  Under r->mu. */
static int commands_and_publish(pgr_relay *r, pgr_conn **done)
{
    for (pgr_conn *c = r->commands, *next; c; c = next) {
        next = c->next_command;
        c->queued = 0;
        if (c->attach_pending) {
            c->attach_pending = 0;
            start_relaying(r, c, done);
        }
        if (c->detach_pending) {
            c->detach_pending = 0;
            if (c->attached)
                hand_back(r, c, PGR_REQUESTED, done);
        }
    }
    r->commands = NULL;
    if (*done) {
        pgr_conn *last = *done;
        while (last->next_handback)
            last = last->next_handback;
        last->next_handback = r->handbacks;
        r->handbacks = *done;
        *done = NULL;
        notify(r->notify_fd);
    }
    return r->stop;
}

static void *run(void *arg)
{
    pgr_relay *r = arg;
    struct epoll_event events[BATCH];
    pgr_conn *done = NULL;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        int stop = commands_and_publish(r, &done);
        pthread_mutex_unlock(&r->mu);
        if (stop)
            return NULL;
        int n = epoll_wait(r->epfd, events, BATCH, -1);
        for (int i = 0; i < n; i++) {
            pgr_end *e = events[i].data.ptr;
            if (!e) {
                uint64_t x;
                ssize_t got = read(r->wake_fd, &x, sizeof x);
                (void)got;
                continue;
            }
            pgr_conn *c = e->conn;
            if (!c->attached)
                continue; /* handed back earlier in this batch */
            int reason = on_event(c, e->side, events[i].events);
            if (reason)
                hand_back(r, c, reason, &done);
            else
                set_interest(c);
        }
    }
}

/* ---- Python's side ------------------------------------------------------------ */

int pgr_start(pgr_relay *r)
{
    memset(r, 0, sizeof *r);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int err = 0;
    if (r->epfd < 0 || r->wake_fd < 0 || r->notify_fd < 0)
        err = errno;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (!err && epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wake_fd, &ev) < 0)
        err = errno;
    if (!err)
        err = pthread_mutex_init(&r->mu, NULL);
    if (!err)
        err = pthread_create(&r->thread, NULL, run, r);
    if (err) {
        for (int *fd = &r->epfd; fd <= &r->notify_fd; fd++)
            if (*fd >= 0)
                close(*fd);
        return -err;
    }
    return 0;
}

void pgr_stop(pgr_relay *r)
{
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    pthread_mutex_unlock(&r->mu);
    notify(r->wake_fd);
    pthread_join(r->thread, NULL);
    close(r->epfd);
    close(r->wake_fd);
    close(r->notify_fd);
}

static void enqueue(pgr_relay *r, pgr_conn *c, int attach)
{
    pthread_mutex_lock(&r->mu);
    if (!c->queued) {
        c->queued = 1;
        c->next_command = r->commands;
        r->commands = c;
    }
    if (attach)
        c->attach_pending = 1;
    else
        c->detach_pending = 1;
    pthread_mutex_unlock(&r->mu);
    notify(r->wake_fd);
}

void pgr_attach(pgr_relay *r, pgr_conn *c, int client_fd, int server_fd, pgf_framer *to_server,
                pgf_framer *to_client, pgs_session *session)
{
    memset(c, 0, sizeof *c);
    c->relay = r;
    c->ends[0] = (pgr_end){c, 0};
    c->ends[1] = (pgr_end){c, 1};
    c->fds[0] = client_fd;
    c->fds[1] = server_fd;
    c->framers[0] = to_server;
    c->framers[1] = to_client;
    c->session = session;
    enqueue(r, c, 1);
}

void pgr_detach(pgr_relay *r, pgr_conn *c)
{
    enqueue(r, c, 0);
}

int pgr_take(pgr_relay *r, pgr_conn **out, int max)
{
    int n = 0;
    pthread_mutex_lock(&r->mu);
    while (r->handbacks && n < max) {
        pgr_conn *c = r->handbacks;
        r->handbacks = c->next_handback;
        if (c->queued) { /* a detach that arrived too late: drop it */
            pgr_conn **p = &r->commands;
            while (*p != c)
                p = &(*p)->next_command;
            *p = c->next_command;
            c->queued = 0;
        }
        out[n++] = c;
    }
    pthread_mutex_unlock(&r->mu);
    return n;
}
