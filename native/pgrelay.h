/*
 * The relay thread: established sessions relayed without the GIL.
 *
 * How this works: after startup and authentication (done in Python), a
 * connection is attached: its two sockets join the relay thread's epoll
 * set, and from then on that thread alone reads, frames (pgframe), tracks
 * the session (pgsession) and sends, one level-triggered event at a time.
 * Anything out of the ordinary (end of stream, a socket error, a protocol
 * violation, a message the C session defers to Python, or Python asking for
 * the connection) ends the attachment: the thread removes both sockets from
 * its epoll set and hands the connection back, with the held message left
 * unconsumed so that Python's pumps see it again.  The framers and the
 * session are the same C structures on both sides, so nothing is copied.
 *
 * Ownership is strict: while attached, only the relay thread touches the
 * connection; Python never frees a connection before it was handed back.
 * Handbacks are published after the thread finished the epoll batch in
 * which they happened, so no later event of that batch can reach freed
 * memory.  Backpressure: a direction whose destination is full stops
 * reading its source until the send window drains (EPOLLOUT), and a client
 * with PGS_MAX_IN_FLIGHT unanswered requests is not read until answers come.
 */
#ifndef PGRELAY_H
#define PGRELAY_H

#include <pthread.h>
#include <stdint.h>

#include "pgframe.h"
#include "pgsession.h"

#define PGR_EOF 1       /* a peer closed its side */
#define PGR_ERROR 2     /* socket error or protocol violation: Python re-raises it */
#define PGR_ESCALATE 3  /* the session needs Python for the held message */
#define PGR_REQUESTED 4 /* Python asked for the connection */

struct pgr_relay;

typedef struct pgr_end {
    struct pgr_conn *conn;
    int side; /* 0: client socket, 1: server socket */
} pgr_end;

typedef struct pgr_conn {
    struct pgr_relay *relay;
    pgr_end ends[2];
    int fds[2];             /* client, server */
    pgf_framer *framers[2]; /* client->server, server->client */
    pgs_session *session;
    uint32_t interest[2];   /* epoll events registered per socket */
    int blocked[2];         /* direction waits for its destination to drain */
    int paused;             /* client->server waits for answers (in-flight limit) */
    int attached;
    int queued;             /* on the command list */
    int attach_pending, detach_pending;
    int reason;             /* why it was handed back */
    struct pgr_conn *next_command;
    struct pgr_conn *next_handback;
} pgr_conn;

typedef struct pgr_relay {
    int epfd;
    int wake_fd;   /* eventfd: Python -> relay thread */
    int notify_fd; /* eventfd: relay thread -> Python */
    pthread_t thread;
    pthread_mutex_t mu; /* guards the two lists, `stop`, and command processing */
    pgr_conn *commands;
    pgr_conn *handbacks;
    int stop;
    uint64_t relayed[2]; /* bytes read from clients [0] and from servers [1]; atomic */
} pgr_relay;

int pgr_start(pgr_relay *r);
void pgr_stop(pgr_relay *r);
void pgr_attach(pgr_relay *r, pgr_conn *c, int client_fd, int server_fd, pgf_framer *to_server,
                pgf_framer *to_client, pgs_session *session);
void pgr_detach(pgr_relay *r, pgr_conn *c);
int pgr_take(pgr_relay *r, pgr_conn **out, int max);

#endif
