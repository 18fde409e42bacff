/*
 * The floor of `realtime-lab bench --scenario scale --baseline floor`: a bare SSE broadcaster.
 *
 * Why it exists: the scale scenario's 10,000 subscribers of one channel cost one send() each
 * per event, whoever writes them. This program is that fan-out and nothing else (one thread,
 * one epoll loop, one send() per subscriber per event, no HTTP beyond a request line, no bus,
 * no history, no accounting, no limits but its own buffers), read by the same load client in
 * the same run, so the report shows what this machine gives a fan-out at all next to what the
 * lab gives. It is a measuring stick, not a server: it listens on 127.0.0.1 only.
 *
 *   argv: RATE                 events per second to every subscriber
 *   out:  PORT\n               once listening (127.0.0.1, a port the kernel chose)
 *
 * Requests (the first line is all it reads; a request head must end within MAX_HEAD bytes):
 *   GET /api/health            200 {"ok":true}, then close
 *   GET /api/channels/...      200 {"last_id":"<epoch>-<seq>"} (the last event sent), close
 *   GET anything else          200 text/event-stream: a subscriber from the next event on
 *   anything else              400, close
 * Every event is framed as the lab frames a ticker token (`id: <epoch>-<seq>`, then `data:` the
 * envelope JSON with its "ts" in ms), so the load client times and checks it as it does the
 * lab's; the lab's stream is HTTP-chunked too, 8 bytes more per event. A
 * subscriber whose socket does not take a whole event at once (a full send buffer) is closed
 * and counted on stderr: the load client then reports it as a disconnect, never as a gap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD 4096
#define MAX_EVENTS 256

/* A connection still sending its request head; subscribers need no state but their fd. */
typedef struct {
    char head[MAX_HEAD];
    size_t used;
} Pending;

static Pending **pending; /* by fd */
static int pending_cap;
static int *members;
static int members_len, members_cap;
static long seq;
static char epoch[16];
static long dropped;

static double mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double wall_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static void *grow(void *p, int *cap, int want, size_t size) {
    if (want < *cap) return p;
    int n = *cap ? *cap : 1024;
    while (n <= want) n *= 2;
    void *q = realloc(p, (size_t)n * size);
    if (!q) {
        perror("floor: realloc");
        exit(1);
    }
    memset((char *)q + (size_t)*cap * size, 0, (size_t)(n - *cap) * size); /* no stale slots */
    *cap = n;
    return q;
}

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    if (fd < pending_cap && pending[fd]) {
        free(pending[fd]);
        pending[fd] = NULL;
    }
}

static void answer(int ep, int fd, const char *status, const char *body) {
    char out[512];
    int n = snprintf(out, sizeof out,
                     "HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n%s",
                     status, strlen(body), body);
    ssize_t sent = send(fd, out, (size_t)n, MSG_NOSIGNAL);
    (void)sent; /* closed next either way */
    drop(ep, fd);
}

static void request(int ep, int fd, const char *line) {
    static const char sse[] =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n";
    if (strncmp(line, "GET ", 4) != 0) {
        answer(ep, fd, "400 Bad Request", "{\"error\":\"GET only\"}");
    } else if (strncmp(line + 4, "/api/health", 11) == 0) {
        answer(ep, fd, "200 OK", "{\"ok\":true}");
    } else if (strncmp(line + 4, "/api/channels/", 14) == 0) {
        char body[96];
        snprintf(body, sizeof body, "{\"last_id\":\"%s-%ld\"}", epoch, seq);
        answer(ep, fd, "200 OK", body);
    } else if (send(fd, sse, sizeof sse - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof sse - 1)) {
        drop(ep, fd);
    } else {
        free(pending[fd]);
        pending[fd] = NULL;
        members = grow(members, &members_cap, members_len, sizeof(int));
        members[members_len++] = fd;
        /* Reads stay watched: a subscriber's close (recv 0) removes it. */
    }
}

static void readable(int ep, int fd) {
    char buf[MAX_HEAD];
    Pending *p = fd < pending_cap ? pending[fd] : NULL;
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n > 0 && !p) return; /* a subscriber's bytes after its request: ignored */
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (!p) { /* a subscriber left */
            for (int i = 0; i < members_len; i++)
                if (members[i] == fd) {
                    members[i] = members[--members_len];
                    break;
                }
        }
        drop(ep, fd);
        return;
    }
    if (p->used + (size_t)n >= MAX_HEAD) {
        answer(ep, fd, "431 Request Header Fields Too Large", "{\"error\":\"head too long\"}");
        return;
    }
    memcpy(p->head + p->used, buf, (size_t)n);
    p->used += (size_t)n;
    p->head[p->used] = '\0';
    if (strstr(p->head, "\r\n\r\n")) request(ep, fd, p->head);
}

static void fan_out(int ep) {
    char data[256], event[512];
    seq++;
    snprintf(data, sizeof data,
             "{\"id\":\"%s-%ld\",\"type\":\"token\",\"data\":{\"text\":\"tick\",\"index\":%ld},"
             "\"ts\":%.3f}",
             epoch, seq, seq - 1, wall_ms());
    int len = snprintf(event, sizeof event, "id: %s-%ld\ndata: %s\n\n", epoch, seq, data);
    for (int i = 0; i < members_len;) {
        int fd = members[i];
        if (send(fd, event, (size_t)len, MSG_NOSIGNAL | MSG_DONTWAIT) == len) {
            i++;
            continue;
        }
        members[i] = members[--members_len]; /* a short write or an error: it is gone */
        drop(ep, fd);
        dropped++;
        fprintf(stderr, "floor: dropped a subscriber (%ld so far)\n", dropped);
    }
}

int main(int argc, char **argv) {
    if (argc != 2 || atof(argv[1]) <= 0) {
        fprintf(stderr, "usage: %s RATE\n", argv[0]);
        return 2;
    }
    double interval = 1.0 / atof(argv[1]);
    signal(SIGPIPE, SIG_IGN);
    snprintf(epoch, sizeof epoch, "floor%x", (unsigned)getpid());
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof addr;
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, 4096) ||
        getsockname(ls, (struct sockaddr *)&addr, &alen)) {
        perror("floor: listen");
        return 1;
    }
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event ready[MAX_EVENTS];
    double next = mono() + interval;
    for (;;) {
        int wait_ms = (int)((next - mono()) * 1000.0);
        int n = epoll_wait(ep, ready, MAX_EVENTS, wait_ms > 0 ? wait_ms : 0);
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            if (fd != ls) {
                readable(ep, fd);
                continue;
            }
            int c;
            while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                pending = grow(pending, &pending_cap, c, sizeof(Pending *));
                pending[c] = calloc(1, sizeof(Pending));
                struct epoll_event e = {.events = EPOLLIN, .data.fd = c};
                if (!pending[c] || epoll_ctl(ep, EPOLL_CTL_ADD, c, &e)) drop(ep, c);
            }
        }
        double now = mono();
        if (now >= next) {
            fan_out(ep);
            next += interval;
            if (next < now) next = now + interval; /* behind by a whole interval: skip, not burst */
        }
    }
}
