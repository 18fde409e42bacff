/*
 * The benchmark's light load client for the streaming transports (SSE, WebSocket, fetch, the
 * OpenAI endpoint) and for the naive baseline server (naive.py).
 *
 * Why C: at 1,000 subscribers and 100 tokens/s the load client reads 100,000 events per second,
 * and at 3,000 it reads 300,000. The asyncio clients of loadgen.py spend about 10-14 us of CPU
 * per event (a data_received call, a parse, a tally), so on a 2-core machine they took more than
 * one core away from the server they were measuring. This program pays one recv() and a few
 * memchr() per event (about 1-2 us, mostly kernel time), so the server gets a core of its own and
 * the benchmark measures the server. No existing load tool reads SSE or WebSocket streams and
 * times each event against a timestamp inside it (wrk, h2load and oha wait for whole responses).
 *
 * It speaks exactly what loadgen.py's SSEClient, WSClient and FetchClient speak and counts the
 * same things
 * the same way (see Client.items there): continuity of the envelope's id, latency = receive wall
 * clock - the envelope's "ts", control events end/reset/error, the overflow signal (SSE "error"
 * event mentioning overflow, WebSocket close 1013). Continuity is the rule of
 * realtime_lab/protocol/sequence.py, copied clause for clause in observe() below and tested
 * against the same table (tests/protocol/sequence_cases.json, via tests/bench/
 * test_bench_sequence.py): lost = gaps, dup = duplicates, reordered, resets. It is driven by one
 * Python load worker over stdin/stdout:
 *
 *   argv: HOST PORT TRANSPORT COUNT HOST_HEADER PATH [BODY]
 *         sse, ws: COUNT readers of the channel of PATH (an after=<event id> in PATH is every
 *         connection's start position, as the server reads it; after=now, after= or none: the
 *         first event opens the run).
 *         The others are COUNT users chatting continuously (the chats workload): each starts a
 *         chat, reads it to its end, and starts the next, until quit. $SEED in BODY (or in
 *         PATH, naive) is the round's seed, user * SEED_STRIDE + round, so that users' chats
 *         differ in length and fall out of step. A round refused before its stream's head
 *         starts again after RETRY_S; one cut after it counts an incomplete chat.
 *         fetch: POST BODY to PATH and read the chat that starts, as SSE, from its first event
 *         (the opening "chat" event names the chat, whose id is the epoch of its events: the
 *         run opens at <id>-0), to its end, on a new connection per chat.
 *         sse-chat, ws-chat: POST BODY to PATH (/api/chats?client=...) on a keep-alive
 *         connection of the user's, take "channel" and "id" from the 201 answer, then open
 *         /sse/<channel>?after=&<PATH's query> (ws-chat: /ws/...) and read it to its end event
 *         (the run opens at <id>-0); its first token is timed from the POST.
 *         openai: POST BODY ("stream": true) to PATH (/v1/chat/completions) and read the
 *         chat.completion.chunk blocks to data: [DONE]. Chunks carry no id and no ts: tokens
 *         (chunks whose delta has text) are counted with no sequence check and no latency.
 *         naive: GET PATH, an SSE stream of envelopes whose ids count from <epoch>-1.
 *         Every round's chat has its time to first token (from the request that started it)
 *         and each token after the first its gap to the one before.
 *   out:  {"op":"opened",...}\n            once every connection has its response head (or failed)
 *   in:   start\n                          begin a measurement window; out: {"op":"started"}\n
 *   in:   stop\n                           end it; out: {"op":"window",...,"latency_count":N,
 *                                          "ttft_count":M,"gap_count":G}\n followed by N native
 *                                          doubles (the latencies in ms), then M (chat rounds:
 *                                          the time to first token of each chat whose first
 *                                          token came in the window), then G (the gaps, ms,
 *                                          between a stream's consecutive tokens in it)
 *   in:   quit\n (or end of input)         close everything and exit 0
 *
 * Malformed server bytes fail that one connection (counted, with a message); nothing here
 * trusts the server to stay within a buffer: every buffer grows to at most MAX_PENDING.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_CONCURRENCY 32 /* as loadgen.py: well under the server's listen backlog */
#define CONNECT_TIMEOUT_S 30.0 /* without one connection opening (or failing) */
/* RTL_LOADCLIENT_SOURCES=127.0.0.2,127.0.0.3,...: bind connection i to source address
 * i % n before connecting. One (source, server address, server port) has only the ephemeral
 * range's ports (/proc/sys/net/ipv4/ip_local_port_range, about 28k): more connections to one
 * server port need more source addresses, and Linux routes all of 127/8 to lo. */
#define SOURCES_ENV "RTL_LOADCLIENT_SOURCES"
#define MAX_SOURCES 64
/* RTL_LOADCLIENT_PORTS=8081,8082,...: several server processes on HOST sharing one bus.
 * Connection i reads its stream from port i % n, and (sse-chat, ws-chat) POSTs its chats to
 * port (i + 1) % n, so that with two or more processes every token crosses the bus from the
 * process generating the chat to the one streaming it. Unset: PORT for everything. */
#define PORTS_ENV "RTL_LOADCLIENT_PORTS"
#define MAX_PORTS 64
#define MAX_PENDING (1 << 20) /* largest unparsed remainder one connection may hold */
#define READ_SIZE (1 << 16)
#define MAX_ERRORS 5
/* Under load (a round of reads found BUSY_ROUND ready sockets) the client naps NAP_US between
 * rounds rather than blocking in epoll_wait, until MAX_IDLE_NAPS naps in a row found nothing.
 * A blocked reader makes every send() of the server's fan-out wake it (try_to_wake_up under the
 * socket's wait-queue lock: about 8% of the server's CPU at 1,000 subscribers), a cost that
 * exists only because the clients share the server's machine: over a real network the server
 * never wakes its clients' processes. A nap adds at most NAP_US to a measured latency, which
 * only makes the numbers more conservative; at low load the client blocks as usual. */
#define NAP_US 200
#define BUSY_ROUND 32
#define MAX_IDLE_NAPS 50
#define OVERFLOW_CLOSE 1013
#define MAX_SKIPPED_RANGES 64 /* as protocol/sequence.py: the oldest skipped ranges go first */
#define MAX_EPOCH 16          /* protocol/cursor.py: <epoch> is 1-16 of [0-9a-z] */
#define MAX_SEQ_DIGITS 18     /* and <seq> is 0 or up to 18 digits without a leading 0 */
#define MAX_ID 40             /* cursor.MAX_CURSOR_LENGTH: anything longer is no id */
/* RFC 6455 section 1.3's example key and its accept value: a load client need not be random. */
#define WS_KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define WS_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
#define CTL_BIT 0x80000000u /* epoll data: the user's POST connection, not its stream */
#define RETRY_S 0.5         /* a refused round starts again after this, as loadgen.py waits */
#define SEED_STRIDE 100000  /* round r of user u asks seed u * SEED_STRIDE + r */
#define MAX_CHANNEL 128

enum { T_SSE, T_WS, T_FETCH, T_OPENAI, T_NAIVE }; /* the framing a stream is read with */
enum { CTL_NONE, CTL_CONNECTING, CTL_SENT, CTL_IDLE }; /* the POST /api/chats connection */
enum { S_IDLE, S_CONNECTING, S_HEAD, S_BODY, S_CLOSED };
enum { K_TOKEN, K_END, K_RESET, K_ERROR, K_CHAT };
enum { V_NEW, V_RESET, V_DUPLICATE, V_REORDERED, V_FOREIGN }; /* sequence.Verdict */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

typedef struct {
    long long low, high;
} range_t;

/* protocol/sequence.py's Sequence state: the current run and the seqs skipped in it. */
typedef struct {
    int open;                  /* a run exists */
    size_t epoch_len;          /* the run's epoch: epoch[0..epoch_len) */
    char epoch[MAX_EPOCH];
    long long last;            /* the run's last seq */
    int n_skipped;             /* skipped[0..n_skipped): ascending, so oldest first */
    range_t skipped[MAX_SKIPPED_RANGES];
} run_t;

/* What a user keeps from one chat round to the next (the rest of conn_t is reset per round). */
typedef struct {
    int ever_opened; /* its first response head arrived */
    int counted;     /* it counts in "opened" or in "failed", once */
    long long round; /* chat rounds started */
    int ctl_fd;      /* sse-chat/ws-chat: the keep-alive connection POST /api/chats goes on */
    int ctl_state;
    int ctl_reused; /* the POST in flight went on a connection that had answered one already */
    buf_t ctl_in;
    double posted_ms; /* when this round's POST was sent: its chat's first token is timed from it */
    char channel[MAX_CHANNEL];
} persist_t;

typedef struct {
    int fd;
    int state;
    persist_t p;
    int first_token;
    double last_token_ms; /* this stream's previous token: the gap to the next is measured */
    double started_ms; /* fetch: when this round's connection (and request) started */
    int chunked;
    long long chunk_left; /* -1: reading a size line; -2: expecting the CRLF after a chunk */
    run_t run;
    int saw_end;
    int ended; /* the stream is over: at its end event, or (chat rounds) once the server ended
                * the response after it, so that nobody's last write meets a closed socket */
    buf_t in;   /* raw bytes not yet consumed (head, chunk framing, WebSocket frames) */
    buf_t line; /* SSE: the current, incomplete line */
    buf_t data; /* SSE: the current block's data */
    char event[16];
    int has_id;
    size_t id_len; /* SSE: the block's id field, id[0..id_len) (longer ones: MAX_ID + 1) */
    char id[MAX_ID + 1];
} conn_t;

/* The tally: window counts reset at "start"; losses, failures and the rest count for life. */
static struct {
    int in_window;
    long long events, bytes, bytes_up;
    long long lost, dup, reordered, resets, overflows, disconnects, failures;
    long long requests, chats, incomplete; /* chat rounds: window counts, and life */
    double *lat;
    size_t lat_len, lat_cap;
    double *ttft;
    size_t ttft_len, ttft_cap;
    double *gap;
    size_t gap_len, gap_cap;
    char errors[MAX_ERRORS][200];
    int n_errors;
} T;

static int transport;
static int posting; /* sse-chat, ws-chat: each round POSTs /api/chats, then reads the channel */
static int rounds;  /* chat rounds: a stream per chat, the next chat once it ended */
static const char *host_header, *path;
static const char *body; /* the chat request every round sends ($SEED: the round's seed) */
static run_t start_run; /* every connection's starting position (after= in PATH) */
static conn_t *conns;
static int count;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_self(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void error_msg(const char *fmt, ...) {
    if (T.n_errors >= MAX_ERRORS) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(T.errors[T.n_errors++], sizeof T.errors[0], fmt, ap);
    va_end(ap);
}

static int buf_append(buf_t *b, const char *p, size_t n) {
    if (b->len + n > MAX_PENDING) return -1;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) return -1;
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
    return 0;
}

static void push(double **values, size_t *len, size_t *cap, double v) {
    if (*len == *cap) {
        *cap = *cap ? *cap * 2 : 65536;
        *values = realloc(*values, *cap * sizeof(double));
        if (!*values) exit(4);
    }
    (*values)[(*len)++] = v;
}

static void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static void write_all(int fd, const void *p, size_t n) {
    const char *q = p;
    while (n) {
        ssize_t w = write(fd, q, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            exit(3); /* the worker went away */
        }
        q += w;
        n -= (size_t)w;
    }
}

static int send_fd(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1; /* a full send buffer for a tiny request or pong: treat as broken */
        }
        p += w;
        n -= (size_t)w;
        if (T.in_window) T.bytes_up += w;
    }
    return 0;
}

static int send_all(conn_t *c, const char *p, size_t n) { return send_fd(c->fd, p, n); }

/* The chat request of user c's current round: the template with $SEED replaced (malloc'd). */
static char *expand(const char *tmpl, const conn_t *c, size_t *out_len) {
    char seed[32];
    snprintf(seed, sizeof seed, "%lld", (long long)(c - conns) * SEED_STRIDE + c->p.round);
    size_t cap = strlen(tmpl) + 32, n = 0;
    char *out = malloc(cap);
    if (!out) exit(4);
    for (const char *q = tmpl; *q;) {
        if (!strncmp(q, "$SEED", 5)) {
            n += (size_t)snprintf(out + n, cap - n, "%s", seed);
            q += 5;
        } else {
            out[n++] = *q++;
        }
        if (n + 32 >= cap) {
            cap *= 2;
            out = realloc(out, cap);
            if (!out) exit(4);
        }
    }
    out[n] = 0;
    *out_len = n;
    return out;
}

/* Closing ------------------------------------------------------------------------------------ */

static int opened, failed;

static void close_conn(conn_t *c) {
    if (c->state == S_CLOSED || c->state == S_IDLE) return;
    close(c->fd);
    c->state = S_CLOSED;
    buf_free(&c->in);
    buf_free(&c->line);
    buf_free(&c->data);
}

static const char *const CLIENT_NAMES[] = {"SSEClient", "WSClient", "FetchClient",
                                           "OpenAIClient", "NaiveClient"};
static void restart_round(conn_t *c);
static void delay_round(conn_t *c);

static void count_failed(conn_t *c) {
    if (!c->p.counted) {
        c->p.counted = 1;
        failed++;
    }
}

/* An unexpected end: before its head it failed, after it a disconnect (as loadgen.py). A chat
 * round cut after its head is an incomplete chat, and the next round starts; one refused before
 * its head starts again after RETRY_S (as loadgen.py's rounds wait after a failed request). */
static void fail_conn(conn_t *c, const char *why) {
    if (c->state == S_CLOSED) return;
    error_msg("%s: %s", CLIENT_NAMES[transport], why);
    int body = c->state == S_BODY;
    if (body) {
        T.disconnects++;
    } else {
        T.failures++;
        count_failed(c);
    }
    close_conn(c);
    if (rounds && body) {
        T.incomplete++;
        restart_round(c);
    } else if (rounds) {
        delay_round(c);
    }
}

/* Events ------------------------------------------------------------------------------------- */

/* Whether p[0..n) is an event id, <epoch>-<seq> exactly as protocol/cursor.py's _ID_RE reads
 * it; if so, *epoch_len is the epoch's length (it starts at p) and *seq the seq. */
static int parse_id(const char *p, size_t n, size_t *epoch_len, long long *seq) {
    if (!p || n > MAX_ID) return 0;
    size_t e = 0;
    while (e < n && ((p[e] >= '0' && p[e] <= '9') || (p[e] >= 'a' && p[e] <= 'z'))) e++;
    if (e == 0 || e > MAX_EPOCH || e + 1 >= n || p[e] != '-') return 0;
    const char *d = p + e + 1;
    size_t digits = n - e - 1;
    if (digits > MAX_SEQ_DIGITS || (digits > 1 && d[0] == '0')) return 0;
    long long v = 0;
    for (size_t i = 0; i < digits; i++) {
        if (d[i] < '0' || d[i] > '9') return 0;
        v = v * 10 + (d[i] - '0');
    }
    *epoch_len = e;
    *seq = v;
    return 1;
}

static void run_open(run_t *r, const char *epoch, size_t epoch_len, long long seq) {
    r->open = 1;
    memcpy(r->epoch, epoch, epoch_len);
    r->epoch_len = epoch_len;
    r->last = seq;
    r->n_skipped = 0;
}

static void skipped_drop_oldest(run_t *r) {
    r->n_skipped--;
    memmove(r->skipped, r->skipped + 1, (size_t)r->n_skipped * sizeof r->skipped[0]);
}

/* Remove seq from the skipped record (splitting its range in place); 0 when it was not there. */
static int skipped_take(run_t *r, long long seq) {
    for (int i = r->n_skipped - 1; i >= 0; i--) { /* newest first, as sequence.py */
        range_t g = r->skipped[i];
        if (seq > g.high) return 0; /* ranges ascend: no older one holds it either */
        if (seq < g.low) continue;
        if (g.low < seq && seq < g.high) { /* split: [low, seq-1] [seq+1, high] */
            if (r->n_skipped == MAX_SKIPPED_RANGES) { /* one too many: the oldest goes */
                if (i == 0) { /* the oldest is the lower half itself */
                    r->skipped[0].low = seq + 1;
                    return 1;
                }
                skipped_drop_oldest(r);
                i--;
            }
            memmove(r->skipped + i + 2, r->skipped + i + 1,
                    (size_t)(r->n_skipped - i - 1) * sizeof r->skipped[0]);
            r->skipped[i].high = seq - 1;
            r->skipped[i + 1].low = seq + 1;
            r->skipped[i + 1].high = g.high;
            r->n_skipped++;
        } else if (g.low < seq) {
            r->skipped[i].high = seq - 1;
        } else if (seq < g.high) {
            r->skipped[i].low = seq + 1;
        } else { /* the range was just seq */
            memmove(r->skipped + i, r->skipped + i + 1,
                    (size_t)(r->n_skipped - i - 1) * sizeof r->skipped[0]);
            r->n_skipped--;
        }
        return 1;
    }
    return 0;
}

/* protocol/sequence.py's Sequence.observe: the verdict on the event id[0..n) (a reset event when
 * reset), counting into the tally. Deliver V_NEW and V_RESET, drop V_DUPLICATE and V_REORDERED;
 * V_FOREIGN (not an id, or none) changed nothing. */
static int observe(run_t *r, const char *id, size_t n, int reset) {
    size_t epoch_len;
    long long seq;
    if (!parse_id(id, n, &epoch_len, &seq)) return V_FOREIGN;
    if (reset) {
        T.resets++;
        run_open(r, id, epoch_len, seq);
        return V_RESET;
    }
    if (!r->open) {
        run_open(r, id, epoch_len, seq);
        return V_NEW;
    }
    if (epoch_len != r->epoch_len || memcmp(id, r->epoch, epoch_len)) {
        T.lost++; /* a channel life ended unannounced: a loss of unknown size */
        run_open(r, id, epoch_len, seq);
        return V_NEW;
    }
    long long last = r->last;
    if (seq == last + 1) {
        r->last = seq;
        return V_NEW;
    }
    if (seq > last) {
        T.lost += seq - last - 1; /* one per id skipped */
        if (r->n_skipped == MAX_SKIPPED_RANGES) skipped_drop_oldest(r);
        r->skipped[r->n_skipped++] = (range_t){last + 1, seq - 1};
        r->last = seq;
        return V_NEW;
    }
    if (skipped_take(r, seq)) {
        T.reordered++; /* the gap stays counted: both facts are */
        return V_REORDERED;
    }
    T.dup++;
    return V_DUPLICATE;
}

/* An after=<value> in the request path: the start position (sequence.Sequence(after)). */
static void parse_start(const char *p) {
    const char *q = strchr(p, '?');
    while (q) {
        q++;
        const char *end = strchr(q, '&');
        size_t n = end ? (size_t)(end - q) : strlen(q);
        if (n >= 6 && !memcmp(q, "after=", 6)) {
            size_t epoch_len;
            long long seq;
            if (parse_id(q + 6, n - 6, &epoch_len, &seq))
                run_open(&start_run, q + 6, epoch_len, seq);
            return;
        }
        q = end;
    }
}

/* The value of "key":"..." in a JSON envelope (our server's, which escapes no quotes there). */
static const char *json_str(const char *p, size_t n, const char *key, size_t *out_len) {
    size_t klen = strlen(key);
    const char *at = memmem(p, n, key, klen);
    if (!at) return NULL;
    const char *start = at + klen;
    const char *end = memchr(start, '"', (size_t)(p + n - start));
    if (!end) return NULL;
    *out_len = (size_t)(end - start);
    return start;
}

static double ts_of(const char *p, size_t n) {
    const char *at = NULL;
    for (const char *q = p; (q = memmem(q, (size_t)(p + n - q), "\"ts\":", 5)); q += 5) at = q;
    if (!at) return 0.0 / 0.0;
    char tmp[40];
    size_t len = (size_t)(p + n - (at + 5));
    if (len >= sizeof tmp) len = sizeof tmp - 1;
    memcpy(tmp, at + 5, len);
    tmp[len] = 0;
    return strtod(tmp, NULL);
}

/* The fetch stream's opening event: its chat's id is the epoch of the chat's events, so the run
 * opens at <id>-0 (a chat is read from its start: anything before its first event is lost). */
static void on_chat(conn_t *c, const char *d, size_t dn) {
    size_t idn = 0;
    const char *id = json_str(d, dn, "\"id\":\"", &idn);
    if (!id || idn == 0 || idn > MAX_EPOCH) return; /* no epoch: the first event opens the run */
    for (size_t i = 0; i < idn; i++)
        if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'z'))) return;
    run_open(&c->run, id, idn, 0);
}

/* One event whose id is id[0..idn) (id NULL: it has none). */
static void on_event(conn_t *c, int kind, const char *id, size_t idn, double ts, double now,
                     int overflow) {
    if (kind == K_ERROR) { /* not part of the sequence */
        if (overflow) {
            T.overflows++;
        } else {
            error_msg("error event received");
        }
        return;
    }
    size_t epoch_len;
    long long seq;
    if (transport == T_NAIVE && !c->run.open && parse_id(id, idn, &epoch_len, &seq))
        run_open(&c->run, id, epoch_len, 0); /* its seqs count from 1 within the chat's epoch */
    int verdict = observe(&c->run, id, idn, kind == K_RESET);
    if (verdict == V_DUPLICATE || verdict == V_REORDERED) return; /* its place has passed */
    if (kind == K_TOKEN) { /* new, or foreign (no id): delivered */
        if (!c->first_token) {
            c->first_token = 1;
            if (rounds && T.in_window) push(&T.ttft, &T.ttft_len, &T.ttft_cap, now - c->started_ms);
        }
        if (T.in_window) {
            T.events++;
            if (ts == ts) push(&T.lat, &T.lat_len, &T.lat_cap, now - ts); /* NaN: no ts */
            if (c->last_token_ms > 0) push(&T.gap, &T.gap_len, &T.gap_cap, now - c->last_token_ms);
        }
        c->last_token_ms = now;
    } else if (kind == K_END) {
        c->saw_end = 1;
        if (!rounds) c->ended = 1;
    } /* K_RESET: observe() counted it */
}

static int kind_of(const char *name, size_t n) {
    if (n == 3 && !memcmp(name, "end", 3)) return K_END;
    if (n == 5 && !memcmp(name, "reset", 5)) return K_RESET;
    if (n == 5 && !memcmp(name, "error", 5)) return K_ERROR;
    if (n == 4 && !memcmp(name, "chat", 4) && transport == T_FETCH) return K_CHAT;
    return K_TOKEN; /* every other type is a delivery, as in loadgen.py */
}

/* An OpenAI stream's block: a chat.completion.chunk (a token when its delta has text), an
 * in-band error, or [DONE], the end. Chunks carry no id and no ts: a token is delivered with no
 * sequence check and no latency (its gap to the previous one is still measured). */
static void openai_chunk(conn_t *c, const char *d, size_t dn, double now) {
    if (dn == 6 && !memcmp(d, "[DONE]", 6)) {
        on_event(c, K_END, NULL, 0, 0.0 / 0.0, now, 0);
        return;
    }
    const char *at = memmem(d, dn, "\"content\":", 10);
    if (!at) { /* the last chunk (finish_reason), usage, or an error */
        if (memmem(d, dn, "\"error\"", 7) && !memmem(d, dn, "\"choices\"", 9))
            error_msg("OpenAIClient: error chunk %.120s", d);
        return;
    }
    const char *v = at + 10, *end = d + dn;
    while (v < end && *v == ' ') v++;
    if (end - v < 2 || v[0] != '"' || v[1] == '"') return; /* "" (the role's chunk) or null */
    on_event(c, K_TOKEN, NULL, 0, 0.0 / 0.0, now, 0);
}

/* SSE ------------------------------------------------------------------------------------------ */

static void sse_dispatch(conn_t *c, double now) {
    const char *d = c->data.p ? c->data.p : "";
    size_t dn = c->data.len;
    if (dn == 0 && !c->has_id) { /* a comment or retry-only block */
        c->event[0] = 0;
        return;
    }
    if (dn && d[dn - 1] == '\n') dn--; /* the spec drops the last data line's LF */
    size_t en = strlen(c->event);
    int kind = (en == 0 || (en == 7 && !memcmp(c->event, "message", 7))) ? K_TOKEN
                                                                          : kind_of(c->event, en);
    if (kind == K_CHAT) {
        on_chat(c, d, dn);
        c->data.len = 0;
        c->event[0] = 0;
        c->has_id = 0;
        return;
    }
    if (transport == T_OPENAI) {
        openai_chunk(c, d, dn, now);
        c->data.len = 0;
        c->event[0] = 0;
        c->has_id = 0;
        return;
    }
    /* The envelope's id; the block's id field for an envelope without one. */
    size_t idn = 0;
    const char *id = json_str(d, dn, "\"id\":\"", &idn);
    if (!id && c->has_id) {
        id = c->id;
        idn = c->id_len;
    }
    int overflow = kind == K_ERROR && memmem(d, dn, "overflow", 8) != NULL;
    on_event(c, kind, id, idn, ts_of(d, dn), now, overflow);
    c->data.len = 0;
    c->event[0] = 0;
    c->has_id = 0;
}

static void sse_line(conn_t *c, const char *p, size_t n, double now) {
    if (n && p[n - 1] == '\r') n--;
    if (n == 0) {
        sse_dispatch(c, now);
        return;
    }
    if (p[0] == ':') return; /* a comment: the server's heartbeat */
    const char *colon = memchr(p, ':', n);
    size_t fn = colon ? (size_t)(colon - p) : n;
    const char *v = colon ? colon + 1 : p + n;
    if (v < p + n && *v == ' ') v++;
    size_t vn = (size_t)(p + n - v);
    if (fn == 4 && !memcmp(p, "data", 4)) {
        if (buf_append(&c->data, v, vn) || buf_append(&c->data, "\n", 1)) c->data.len = 0;
    } else if (fn == 2 && !memcmp(p, "id", 2)) {
        c->has_id = 1;
        c->id_len = vn <= MAX_ID ? vn : MAX_ID + 1; /* too long for an id, whatever it says */
        memcpy(c->id, v, vn <= MAX_ID ? vn : MAX_ID);
    } else if (fn == 5 && !memcmp(p, "event", 5)) {
        size_t k = vn < sizeof c->event - 1 ? vn : sizeof c->event - 1;
        memcpy(c->event, v, k);
        c->event[k] = 0;
    } /* retry and unknown fields: nothing to count */
}

/* SSE text (de-chunked): split into lines, carrying an incomplete line over to the next read. */
static void sse_feed(conn_t *c, const char *p, size_t n, double now) {
    while (n) {
        const char *nl = memchr(p, '\n', n);
        if (!nl) {
            if (buf_append(&c->line, p, n)) fail_conn(c, "SSE line longer than 1 MiB");
            return;
        }
        size_t k = (size_t)(nl - p);
        if (c->line.len) {
            if (buf_append(&c->line, p, k)) {
                fail_conn(c, "SSE line longer than 1 MiB");
                return;
            }
            sse_line(c, c->line.p, c->line.len, now);
            c->line.len = 0;
        } else {
            sse_line(c, p, k, now);
        }
        p += k + 1;
        n -= k + 1;
    }
}

/* Chunked framing around the SSE text; returns how many bytes of p it consumed. */
static size_t chunked_feed(conn_t *c, const char *p, size_t n, double now) {
    size_t pos = 0;
    while (pos < n && c->state == S_BODY && !c->ended) { /* after the end: the caller closes */
        if (c->chunk_left == -1) {
            const char *eol = memmem(p + pos, n - pos, "\r\n", 2);
            if (!eol) {
                if (n - pos > 64) fail_conn(c, "bad chunk size line");
                break;
            }
            char *end;
            long long size = strtoll(p + pos, &end, 16);
            if (end == p + pos || (end < eol && *end != ';')) {
                fail_conn(c, "bad chunk size");
                break;
            }
            pos = (size_t)(eol - p) + 2;
            if (size == 0 && c->saw_end) { /* the response's end, after the stream's */
                c->ended = 1;
                break;
            }
            if (size == 0) { /* the last chunk: the server ended the stream */
                fail_conn(c, "stream ended by the server");
                break;
            }
            c->chunk_left = size;
        } else if (c->chunk_left == -2) {
            if (n - pos < 2) break;
            if (p[pos] != '\r' || p[pos + 1] != '\n') {
                fail_conn(c, "chunk not followed by CRLF");
                break;
            }
            pos += 2;
            c->chunk_left = -1;
        } else {
            size_t take = n - pos < (size_t)c->chunk_left ? n - pos : (size_t)c->chunk_left;
            sse_feed(c, p + pos, take, now);
            pos += take;
            c->chunk_left -= (long long)take;
            if (c->chunk_left == 0) c->chunk_left = -2;
        }
    }
    return pos;
}

/* WebSocket ------------------------------------------------------------------------------------ */

static void ws_message(conn_t *c, const char *p, size_t n, double now) {
    size_t tn, idn;
    const char *type = json_str(p, n, "\"type\":\"", &tn);
    const char *id = json_str(p, n, "\"id\":\"", &idn);
    int kind = type ? (tn == 5 && !memcmp(type, "token", 5) ? K_TOKEN : kind_of(type, tn))
                    : K_ERROR;
    on_event(c, kind, id, id ? idn : 0, ts_of(p, n), now, 0);
}

static size_t ws_feed(conn_t *c, const char *p, size_t n, double now) {
    size_t pos = 0;
    while (c->state == S_BODY && !c->ended && n - pos >= 2) { /* after the end: closed */
        unsigned char b0 = (unsigned char)p[pos], b1 = (unsigned char)p[pos + 1];
        if (b1 & 0x80) {
            fail_conn(c, "ws: server frames must not be masked");
            break;
        }
        uint64_t len = b1 & 0x7F;
        size_t head = 2;
        if (len == 126) {
            if (n - pos < 4) break;
            len = ((uint64_t)(unsigned char)p[pos + 2] << 8) | (unsigned char)p[pos + 3];
            head = 4;
        } else if (len == 127) {
            if (n - pos < 10) break;
            len = 0;
            for (size_t i = 0; i < 8; i++) len = (len << 8) | (unsigned char)p[pos + 2 + i];
            head = 10;
        }
        if (len > MAX_PENDING) {
            fail_conn(c, "ws: frame larger than 1 MiB");
            break;
        }
        if (n - pos < head + len) break;
        const char *payload = p + pos + head;
        pos += head + len;
        int opcode = b0 & 0x0F;
        if (!(b0 & 0x80) || opcode == 0) {
            fail_conn(c, "ws: fragmented message (the server sends whole frames)");
            break;
        }
        if (opcode == 0x1) {
            ws_message(c, payload, len, now);
        } else if (opcode == 0x9) { /* ping: answer a pong with the same payload, masked */
            char frame[6 + 125];
            if (len > 125) {
                fail_conn(c, "ws: ping payload over 125 bytes");
                break;
            }
            const unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
            frame[0] = (char)0x8A;
            frame[1] = (char)(0x80 | len);
            memcpy(frame + 2, mask, 4);
            for (size_t i = 0; i < len; i++) frame[6 + i] = (char)(payload[i] ^ mask[i & 3]);
            if (send_all(c, frame, 6 + len)) fail_conn(c, "ws: pong failed");
        } else if (opcode == 0x8) {
            int code = len >= 2 ? ((unsigned char)payload[0] << 8) | (unsigned char)payload[1]
                                : 1005;
            if (code == OVERFLOW_CLOSE) {
                T.overflows++;
                close_conn(c);
            } else if (code == 1000 && c->saw_end) {
                c->ended = 1; /* the caller closes (and starts the next round) */
            } else {
                char why[64];
                snprintf(why, sizeof why, "ws: closed %d", code);
                fail_conn(c, why);
            }
        }
    }
    return pos;
}

/* HTTP ------------------------------------------------------------------------------------------ */

/* A POST of this round's chat request (fetch, openai, and the POST /api/chats of sse-chat and
 * ws-chat) on fd; 0 when sent. */
static int send_post(conn_t *c, int fd, const char *target, const char *accept) {
    size_t body_n;
    char *b = expand(body, c, &body_n);
    size_t cap = strlen(target) + strlen(host_header) + body_n + 256;
    char *post = malloc(cap);
    if (!post) exit(4);
    int n = snprintf(post, cap,
                     "POST %s HTTP/1.1\r\nHost: %s\r\n%s"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     target, host_header, accept, body_n, b);
    int sent = n > 0 && (size_t)n < cap && !send_fd(fd, post, (size_t)n);
    free(post);
    free(b);
    if (sent && T.in_window) T.requests++;
    return sent ? 0 : -1;
}

/* What the stream of this round asks for: the channel the POST named (sse-chat, ws-chat), the
 * chat of this round's seed (naive), or PATH (malloc'd). */
static char *stream_target(conn_t *c) {
    size_t n;
    if (transport == T_NAIVE) return expand(path, c, &n);
    if (!posting) return strdup(path);
    const char *query = strchr(path, '?');
    size_t cap = strlen(path) + MAX_CHANNEL + 32;
    char *out = malloc(cap);
    if (!out) exit(4);
    /* after= (empty): the channel from its first event, as loadgen.py's chat readers ask */
    snprintf(out, cap, "/%s/%s?after=%s%s", transport == T_WS ? "ws" : "sse", c->p.channel,
             query ? "&" : "", query ? query + 1 : "");
    return out;
}

static void send_request(conn_t *c) {
    if (transport == T_FETCH || transport == T_OPENAI) {
        if (send_post(c, c->fd, path, "Accept: text/event-stream\r\n"))
            fail_conn(c, "could not send the request");
        return;
    }
    char req[2048];
    int n;
    char *target = stream_target(c);
    if (transport == T_WS) {
        n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: "
                     "Upgrade\r\nSec-WebSocket-Key: " WS_KEY "\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     target, host_header);
    } else {
        n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", target,
                     host_header);
    }
    free(target);
    if (n <= 0 || (size_t)n >= sizeof req || send_all(c, req, (size_t)n)) {
        fail_conn(c, "could not send the request");
    } else if (T.in_window) {
        T.requests++;
    }
}

/* The response head; returns the bytes consumed, 0 when it has not arrived yet. */
static size_t head_feed(conn_t *c, const char *p, size_t n) {
    const char *end = memmem(p, n, "\r\n\r\n", 4);
    if (!end) {
        if (n > 65536) fail_conn(c, "response head larger than 64 KiB");
        return 0;
    }
    size_t hn = (size_t)(end - p) + 4;
    int status = 0;
    if (n < 12 || memcmp(p, "HTTP/1.", 7) || sscanf(p + 9, "%3d", &status) != 1) {
        fail_conn(c, "bad status line");
        return hn;
    }
    int want = transport == T_WS ? 101 : 200;
    if (status != want) {
        char why[64];
        snprintf(why, sizeof why, "HTTP %d", status);
        fail_conn(c, why);
        return hn;
    }
    char *head = strndup(p, hn);
    if (!head) exit(4);
    for (char *q = head; *q; q++)
        if (*q >= 'A' && *q <= 'Z') *q = (char)(*q - 'A' + 'a');
    if (transport != T_WS) {
        c->chunked = strstr(head, "\r\ntransfer-encoding: chunked") != NULL;
    } else {
        char *acc = strstr(head, "\r\nsec-websocket-accept:");
        int ok = 0;
        if (acc) { /* compare against the original case: base64 is case-sensitive */
            const char *v = p + (acc - head) + 23;
            while (*v == ' ') v++;
            ok = !strncmp(v, WS_ACCEPT, strlen(WS_ACCEPT));
        }
        if (!ok) {
            free(head);
            fail_conn(c, "ws: bad Sec-WebSocket-Accept");
            return hn;
        }
    }
    free(head);
    c->state = S_BODY;
    c->chunk_left = -1;
    if (!c->p.ever_opened) {
        c->p.ever_opened = 1;
        if (!c->p.counted) {
            c->p.counted = 1;
            opened++;
        }
    }
    return hn;
}

static size_t body_feed(conn_t *c, const char *p, size_t n, double now) {
    if (transport == T_WS) return ws_feed(c, p, n, now);
    if (c->chunked) return chunked_feed(c, p, n, now);
    sse_feed(c, p, n, now);
    return n;
}

/* A stream read to its end: closed; in chat rounds, the chat counts and the next starts. */
static void finish_stream(conn_t *c) {
    close_conn(c);
    if (rounds) {
        if (T.in_window) T.chats++;
        restart_round(c);
    }
}

/* Bytes received on c: parse what they complete, keep the rest. */
static void on_bytes(conn_t *c, const char *p, size_t n, double now) {
    if (T.in_window) T.bytes += (long long)n;
    if (c->in.len) {
        if (buf_append(&c->in, p, n)) {
            fail_conn(c, "more than 1 MiB unparsed");
            return;
        }
        p = c->in.p;
        n = c->in.len;
    }
    size_t pos = 0;
    if (c->state == S_HEAD) {
        pos = head_feed(c, p, n);
        if (pos == 0 && c->state == S_HEAD) {
            if (!c->in.len && buf_append(&c->in, p, n)) fail_conn(c, "head too large");
            return;
        }
    }
    if (c->state == S_BODY && pos < n) pos += body_feed(c, p + pos, n - pos, now);
    if (c->state == S_BODY && c->ended) {
        finish_stream(c);
        return;
    }
    if (c->state == S_CLOSED) return;
    size_t rest = n - pos;
    if (c->in.len) { /* p is c->in.p */
        memmove(c->in.p, c->in.p + pos, rest);
        c->in.len = rest;
    } else if (rest && buf_append(&c->in, p + pos, rest)) {
        fail_conn(c, "more than 1 MiB unparsed");
    }
}

/* Main loop --------------------------------------------------------------------------------------- */

static int ep;
static struct sockaddr_storage addr;
static socklen_t addr_len;
static struct sockaddr_in sources[MAX_SOURCES];
static int n_sources;
static uint16_t ports[MAX_PORTS]; /* network order; n_ports == 0: addr's own port */
static int n_ports;

/* PORTS_ENV's ports; returns -1 (with a message) on a bad list or a non-IPv4 HOST. */
static int parse_ports(void) {
    const char *env = getenv(PORTS_ENV);
    if (!env || !*env) return 0;
    if (addr.ss_family != AF_INET) {
        fprintf(stderr, "loadclient: %s needs an IPv4 HOST\n", PORTS_ENV);
        return -1;
    }
    for (const char *p = env; *p;) {
        char *end;
        long port = strtol(p, &end, 10);
        if (end == p || port < 1 || port > 65535 || (*end && *end != ',') || n_ports == MAX_PORTS) {
            fprintf(stderr, "loadclient: %s: expected at most %d ports, got %s\n", PORTS_ENV,
                    MAX_PORTS, env);
            return -1;
        }
        ports[n_ports++] = htons((uint16_t)port);
        p = *end ? end + 1 : end;
    }
    return 0;
}

/* Where connection c connects: its stream's process, or (ctl) the one it POSTs chats to. */
static const struct sockaddr *conn_addr(const conn_t *c, int ctl, struct sockaddr_in *scratch) {
    if (!n_ports) return (const struct sockaddr *)&addr;
    memcpy(scratch, &addr, sizeof *scratch);
    long i = (long)(c - conns) + (ctl ? 1 : 0);
    scratch->sin_port = ports[i % n_ports];
    return (const struct sockaddr *)scratch;
}

/* SOURCES_ENV's addresses; returns -1 (with a message) on a bad list. */
static int parse_sources(void) {
    const char *env = getenv(SOURCES_ENV);
    if (!env || !*env) return 0;
    char list[MAX_SOURCES * 16 + 1];
    if (strlen(env) >= sizeof list) {
        fprintf(stderr, "loadclient: %s: too long\n", SOURCES_ENV);
        return -1;
    }
    strcpy(list, env);
    for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (n_sources == MAX_SOURCES) {
            fprintf(stderr, "loadclient: %s: at most %d addresses\n", SOURCES_ENV, MAX_SOURCES);
            return -1;
        }
        struct sockaddr_in *s = &sources[n_sources++];
        s->sin_family = AF_INET;
        s->sin_port = 0;
        if (inet_pton(AF_INET, tok, &s->sin_addr) != 1) {
            fprintf(stderr, "loadclient: %s: %s is no IPv4 address\n", SOURCES_ENV, tok);
            return -1;
        }
    }
    return 0;
}

/* Many thousands of connections need as many descriptors: soft limit up to the hard one. */
static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Bind c's socket to its source address (connection i: sources[i % n]); the port is chosen at
 * connect() (IP_BIND_ADDRESS_NO_PORT), so it is unique per 4-tuple, not per address. */
static int bind_source(conn_t *c) {
    if (!n_sources || addr.ss_family != AF_INET) return 0;
    int one = 1;
    setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    const struct sockaddr_in *s = &sources[(c - conns) % n_sources];
    if (bind(c->fd, (const struct sockaddr *)s, sizeof *s) == 0) return 0;
    char ip[INET_ADDRSTRLEN], why[160];
    inet_ntop(AF_INET, &s->sin_addr, ip, sizeof ip);
    snprintf(why, sizeof why, "bind %s: %s", ip, strerror(errno));
    fail_conn(c, why);
    return -1;
}

static void start_connect(conn_t *c) {
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        c->state = S_CONNECTING; /* so that fail_conn counts it; close(-1) is harmless */
        fail_conn(c, strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = S_CONNECTING;
    c->run = start_run;
    c->started_ms = now_ms(); /* a chat's first token is timed from here, as loadgen.py does */
    if (bind_source(c)) return;
    struct sockaddr_in to;
    if (connect(c->fd, conn_addr(c, 0, &to), addr_len) < 0 && errno != EINPROGRESS) {
        /* EADDRNOTAVAIL: every port of the ephemeral range is taken for this source address */
        fail_conn(c, errno == EADDRNOTAVAIL
                         ? "connect: no free local port (ip_local_port_range; more sources)"
                         : strerror(errno));
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) fail_conn(c, strerror(errno));
}

/* The POST /api/chats connection (sse-chat, ws-chat) -------------------------------------- */

static void post_chat(conn_t *c);

static void ctl_close(conn_t *c) {
    if (c->p.ctl_fd >= 0) close(c->p.ctl_fd);
    c->p.ctl_fd = -1;
    c->p.ctl_state = CTL_NONE;
    buf_free(&c->p.ctl_in);
}

/* A POST refused or cut: counted as a failed request, and the round starts again later. */
static void ctl_fail(conn_t *c, const char *why) {
    error_msg("%s: POST /api/chats: %s", CLIENT_NAMES[transport], why);
    T.failures++;
    count_failed(c);
    ctl_close(c);
    delay_round(c);
}

static void ctl_send(conn_t *c) {
    if (send_post(c, c->p.ctl_fd, path, "")) {
        ctl_fail(c, "could not send the request");
        return;
    }
    c->p.ctl_state = CTL_SENT;
}

static void ctl_connect(conn_t *c) {
    c->p.ctl_reused = 0;
    c->p.ctl_fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->p.ctl_fd < 0) {
        ctl_fail(c, strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(c->p.ctl_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->p.ctl_state = CTL_CONNECTING;
    struct sockaddr_in to;
    if (connect(c->p.ctl_fd, conn_addr(c, 1, &to), addr_len) < 0 && errno != EINPROGRESS) {
        ctl_fail(c, strerror(errno));
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN,
                             .data.u32 = (uint32_t)(c - conns) | CTL_BIT};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->p.ctl_fd, &ev) < 0) ctl_fail(c, strerror(errno));
}

/* This round's chat: on the kept-alive connection when there is one, else on a new one. */
static void post_chat(conn_t *c) {
    c->p.posted_ms = now_ms();
    if (c->p.ctl_state == CTL_IDLE) {
        /* An idle keep-alive the server has given up on (its header timeout answers 408 and
         * closes) is not reused: its bytes may be waiting unread behind other sockets'. */
        char probe;
        ssize_t r = recv(c->p.ctl_fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT);
        if (r >= 0 || (errno != EAGAIN && errno != EINTR)) c->p.ctl_state = CTL_NONE;
    }
    if (c->p.ctl_state == CTL_IDLE) {
        c->p.ctl_reused = 1;
        ctl_send(c);
    } else {
        ctl_close(c);
        ctl_connect(c);
    }
}

/* The answer to POST /api/chats, once whole: the channel to read, and its chat's id, which is
 * the epoch of its events (the run opens at <id>-0: the chat is read from its first event). */
static void ctl_answer(conn_t *c) {
    buf_t *in = &c->p.ctl_in;
    const char *p = in->p;
    const char *end = memmem(p, in->len, "\r\n\r\n", 4);
    if (!end) {
        if (in->len > 65536) ctl_fail(c, "response head larger than 64 KiB");
        return;
    }
    size_t hn = (size_t)(end - p) + 4;
    int status = 0;
    if (in->len < 12 || memcmp(p, "HTTP/1.", 7) || sscanf(p + 9, "%3d", &status) != 1) {
        ctl_fail(c, "bad status line");
        return;
    }
    char *head = strndup(p, hn);
    if (!head) exit(4);
    for (char *q = head; *q; q++)
        if (*q >= 'A' && *q <= 'Z') *q = (char)(*q - 'A' + 'a');
    const char *cl = strstr(head, "\r\ncontent-length:");
    long long length = cl ? strtoll(cl + 17, NULL, 10) : -1;
    int keep = strstr(head, "\r\nconnection: close") == NULL;
    free(head);
    if (length < 0 || length > MAX_PENDING) {
        ctl_fail(c, "no Content-Length");
        return;
    }
    if (in->len < hn + (size_t)length) return; /* the rest of the body is on its way */
    const char *b = p + hn;
    size_t bn = (size_t)length, idn = 0, chn = 0;
    const char *id = json_str(b, bn, "\"id\":\"", &idn);
    const char *channel = json_str(b, bn, "\"channel\":\"", &chn);
    if (status == 408 && c->p.ctl_reused) { /* it timed the idle connection out as we reused it */
        ctl_close(c);
        ctl_connect(c);
        return;
    }
    if (status != 201) {
        char why[64];
        snprintf(why, sizeof why, "HTTP %d", status);
        ctl_fail(c, why);
        return;
    }
    int ok = channel && chn > 0 && chn < MAX_CHANNEL;
    for (size_t i = 0; ok && i < chn; i++) /* it goes into a path: only what needs no quoting */
        ok = (channel[i] >= '0' && channel[i] <= '9') || (channel[i] >= 'a' && channel[i] <= 'z') ||
             (channel[i] >= 'A' && channel[i] <= 'Z') || strchr("._-:", channel[i]);
    if (!ok) {
        ctl_fail(c, "no channel in the answer");
        return;
    }
    memcpy(c->p.channel, channel, chn);
    c->p.channel[chn] = 0;
    run_t run = start_run;
    size_t epoch_len;
    long long seq;
    if (id && idn <= MAX_EPOCH) {
        char probe[MAX_EPOCH + 3];
        snprintf(probe, sizeof probe, "%.*s-0", (int)idn, id);
        if (parse_id(probe, idn + 2, &epoch_len, &seq)) run_open(&run, probe, epoch_len, 0);
    }
    size_t used = hn + (size_t)length;
    memmove(in->p, in->p + used, in->len - used);
    in->len -= used;
    if (keep) {
        c->p.ctl_state = CTL_IDLE;
    } else {
        ctl_close(c);
    }
    start_connect(c);
    if (c->state == S_CONNECTING) { /* the stream's first token is timed from the POST */
        c->run = run;
        c->started_ms = c->p.posted_ms;
    }
}

static void on_ctl_ready(conn_t *c, uint32_t events, char *scratch) {
    if (c->p.ctl_fd < 0) return; /* closed earlier in this batch of events */
    if (c->p.ctl_state == CTL_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->p.ctl_fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            ctl_fail(c, strerror(err));
            return;
        }
        if (!(events & EPOLLOUT)) return;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(c - conns) | CTL_BIT};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->p.ctl_fd, &ev);
        ctl_send(c);
        return;
    }
    for (;;) {
        ssize_t r = recv(c->p.ctl_fd, scratch, READ_SIZE, 0);
        if (r > 0) {
            if (T.in_window) T.bytes += r;
            if (c->p.ctl_state != CTL_SENT) { /* nothing was asked: not HTTP/1.1 as we know it */
                ctl_close(c);
                return;
            }
            if (buf_append(&c->p.ctl_in, scratch, (size_t)r)) {
                ctl_fail(c, "answer larger than 1 MiB");
                return;
            }
            ctl_answer(c);
            if (c->p.ctl_fd < 0 || r < READ_SIZE) return;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (c->p.ctl_state == CTL_SENT && c->p.ctl_reused && !c->p.ctl_in.len) {
            ctl_close(c); /* the server closed an idle keep-alive as it was reused: ask again */
            ctl_connect(c);
        } else if (c->p.ctl_state == CTL_SENT) {
            ctl_fail(c, r == 0 ? "connection closed by the server" : strerror(errno));
        } else {
            ctl_close(c); /* an idle keep-alive the server ended: the next POST reconnects */
        }
        return;
    }
}

/* Rounds ------------------------------------------------------------------------------------ */

/* A user's next chat: POST /api/chats then the stream (sse-chat, ws-chat), or the one request
 * that starts and streams it (fetch, openai, naive). */
static void begin_round(conn_t *c) {
    c->p.round++;
    if (posting) {
        post_chat(c);
    } else {
        start_connect(c);
    }
}

/* The next chat of a user's rounds, on a new stream connection (a chat's stream ends with its
 * chat). Queued, and started by the main loop once the current batch of events is handled:
 * the closed connection's parser may still be on the stack. A refused round waits RETRY_S in
 * a FIFO (every wait is as long, so it stays in time order). */
static int *restarts, n_restarts;
static struct {
    int user;
    double at;
} *delayed;
static size_t delayed_head, delayed_len;

static void restart_round(conn_t *c) {
    restarts[n_restarts++] = (int)(c - conns);
}

static void delay_round(conn_t *c) {
    size_t slot = (delayed_head + delayed_len++) % (size_t)count;
    delayed[slot].user = (int)(c - conns);
    delayed[slot].at = mono_s() + RETRY_S;
}

static void reset_round(conn_t *c) {
    persist_t keep = c->p;
    memset(c, 0, sizeof *c); /* close_conn freed its buffers */
    c->p = keep;
    begin_round(c);
}

static void start_rounds(void) {
    while (n_restarts) reset_round(&conns[restarts[--n_restarts]]);
    double now = mono_s();
    while (delayed_len && delayed[delayed_head].at <= now) {
        conn_t *c = &conns[delayed[delayed_head].user];
        delayed_head = (delayed_head + 1) % (size_t)count;
        delayed_len--;
        reset_round(c);
    }
}

static void on_ready(conn_t *c, uint32_t events, char *scratch) {
    if (c->state == S_CLOSED) return; /* closed earlier in this batch of events */
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            fail_conn(c, strerror(err));
            return;
        }
        if (!(events & EPOLLOUT)) return;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(c - conns)};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->state = S_HEAD;
        send_request(c);
        return;
    }
    for (;;) {
        ssize_t r = recv(c->fd, scratch, READ_SIZE, 0);
        if (r > 0) {
            on_bytes(c, scratch, (size_t)r, now_ms());
            if (c->state == S_CLOSED || r < READ_SIZE) return;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (r == 0 && c->saw_end && c->state == S_BODY) { /* a response that ends at close */
            finish_stream(c);
            return;
        }
        fail_conn(c, r == 0 ? "connection closed by the server" : strerror(errno));
        return;
    }
}

static void json_errors(char *out, size_t cap) {
    size_t n = 0;
    n += (size_t)snprintf(out + n, cap - n, "[");
    for (int i = 0; i < T.n_errors && n < cap; i++) {
        n += (size_t)snprintf(out + n, cap - n, "%s\"", i ? "," : "");
        for (const char *q = T.errors[i]; *q && n + 8 < cap; q++) {
            if (*q == '"' || *q == '\\') out[n++] = '\\';
            out[n++] = (*q >= 32 && *q < 127) ? *q : '?';
        }
        n += (size_t)snprintf(out + n, cap - n, "\"");
    }
    if (n < cap) snprintf(out + n, cap - n, "]");
}

static void report_opened(void) {
    char errs[1500], out[2048];
    json_errors(errs, sizeof errs);
    int n = snprintf(out, sizeof out,
                     "{\"op\":\"opened\",\"clients\":%d,\"failures\":%d,\"errors\":%s}\n", opened,
                     failed, errs);
    write_all(1, out, (size_t)n);
}

static double window_cpu;

static void report_window(void) {
    char errs[1500], out[4096];
    json_errors(errs, sizeof errs);
    int n = snprintf(out, sizeof out,
                     "{\"op\":\"window\",\"events\":%lld,\"bytes\":%lld,\"bytes_up\":%lld,"
                     "\"lost\":%lld,\"dup\":%lld,\"reordered\":%lld,\"resets\":%lld,"
                     "\"overflows\":%lld,"
                     "\"disconnects\":%lld,\"failures\":%lld,\"requests\":%lld,"
                     "\"chats\":%lld,\"incomplete\":%lld,\"cpu\":%.6f,\"errors\":%s,"
                     "\"latency_count\":%zu,\"ttft_count\":%zu,\"gap_count\":%zu}\n",
                     T.events, T.bytes, T.bytes_up, T.lost, T.dup, T.reordered, T.resets,
                     T.overflows, T.disconnects, T.failures, T.requests, T.chats, T.incomplete,
                     cpu_self() - window_cpu, errs, T.lat_len, T.ttft_len, T.gap_len);
    write_all(1, out, (size_t)n);
    if (T.lat_len) write_all(1, T.lat, T.lat_len * sizeof(double));
    if (T.ttft_len) write_all(1, T.ttft, T.ttft_len * sizeof(double));
    if (T.gap_len) write_all(1, T.gap, T.gap_len * sizeof(double));
    T.lat_len = T.ttft_len = T.gap_len = 0;
}

/* One command line from the worker; returns 0 to quit. */
static int command(const char *line) {
    if (!strcmp(line, "start")) {
        T.events = T.bytes = T.bytes_up = T.requests = T.chats = 0;
        T.lat_len = T.ttft_len = T.gap_len = 0;
        window_cpu = cpu_self();
        T.in_window = 1;
        write_all(1, "{\"op\":\"started\"}\n", 17);
    } else if (!strcmp(line, "stop")) {
        T.in_window = 0;
        report_window();
    } else if (!strcmp(line, "quit")) {
        return 0;
    } else {
        fprintf(stderr, "loadclient: unknown command %s\n", line);
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 7 || argc > 8) {
        fprintf(stderr,
                "usage: %s HOST PORT sse|ws|fetch|sse-chat|ws-chat|openai|naive COUNT "
                "HOST_HEADER PATH [BODY]\n",
                argv[0]);
        return 2;
    }
    static const struct {
        const char *name;
        int transport, posting, rounds, body;
    } NAMES[] = {
        {"sse", T_SSE, 0, 0, 0},         {"ws", T_WS, 0, 0, 0},
        {"fetch", T_FETCH, 0, 1, 1},     {"sse-chat", T_SSE, 1, 1, 1},
        {"ws-chat", T_WS, 1, 1, 1},      {"openai", T_OPENAI, 0, 1, 1},
        {"naive", T_NAIVE, 0, 1, 0},
    };
    size_t which = 0;
    while (which < sizeof NAMES / sizeof NAMES[0] && strcmp(argv[3], NAMES[which].name)) which++;
    if (which == sizeof NAMES / sizeof NAMES[0]) {
        fprintf(stderr,
                "loadclient: transport must be sse, ws, fetch, sse-chat, ws-chat, openai or "
                "naive\n");
        return 2;
    }
    transport = NAMES[which].transport;
    posting = NAMES[which].posting;
    rounds = NAMES[which].rounds;
    if (NAMES[which].body != (argc == 8)) {
        fprintf(stderr, "loadclient: BODY is for fetch, sse-chat, ws-chat and openai, which "
                        "need one\n");
        return 2;
    }
    if (argc == 8) body = argv[7];
    count = atoi(argv[4]);
    host_header = argv[5];
    path = argv[6];
    parse_start(path);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    int rc = getaddrinfo(argv[1], argv[2], &hints, &ai);
    if (rc) {
        fprintf(stderr, "loadclient: %s: %s\n", argv[1], gai_strerror(rc));
        return 2;
    }
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    addr_len = ai->ai_addrlen;
    freeaddrinfo(ai);
    if (parse_sources() || parse_ports()) return 2;
    raise_nofile();

    conns = calloc((size_t)(count > 0 ? count : 1), sizeof *conns);
    restarts = calloc((size_t)(count > 0 ? count : 1), sizeof *restarts);
    delayed = calloc((size_t)(count > 0 ? count : 1), sizeof *delayed);
    if (!delayed) return 4;
    for (int i = 0; i < count && conns; i++) conns[i].p.ctl_fd = -1;
    char *scratch = malloc(READ_SIZE);
    struct epoll_event *evs = malloc(sizeof *evs * 1024);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || !restarts || !scratch || !evs || ep < 0) return 4;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sin = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sin);

    int next = 0, reported = 0, napping = 0, idle_naps = 0;
    double deadline = mono_s() + CONNECT_TIMEOUT_S;
    int progress = 0; /* opened + failed when the deadline was last pushed back */
    char cmd[256];
    size_t cmd_len = 0;
    for (;;) {
        start_rounds();
        /* Keep at most CONNECT_CONCURRENCY connections between connect() and their head. */
        while (next < count && next - opened - failed < CONNECT_CONCURRENCY)
            begin_round(&conns[next++]);
        if (!reported && next == count && opened + failed >= count) {
            report_opened();
            reported = 1;
        }
        if (opened + failed != progress) { /* 50,000 connections may take longer than 30 s */
            progress = opened + failed;
            deadline = mono_s() + CONNECT_TIMEOUT_S;
        }
        if (!reported && mono_s() > deadline) {
            for (int i = 0; i < next; i++) {
                if (conns[i].state == S_CONNECTING || conns[i].state == S_HEAD)
                    fail_conn(&conns[i], "connect: timed out");
                else if (conns[i].p.ctl_state == CTL_CONNECTING ||
                         conns[i].p.ctl_state == CTL_SENT)
                    ctl_fail(&conns[i], "timed out");
            }
            for (; next < count; next++) {
                T.failures++;
                failed++;
            }
            continue;
        }
        /* Under load, read in rounds and nap between them instead of blocking (see NAP_US). */
        int n = epoll_wait(ep, evs, 1024, napping ? 0 : 100);
        if (n >= BUSY_ROUND && reported) {
            napping = 1;
            idle_naps = 0;
        } else if (n == 0 && napping) {
            if (++idle_naps > MAX_IDLE_NAPS) {
                napping = 0;
            } else {
                const struct timespec nap = {0, NAP_US * 1000L};
                nanosleep(&nap, NULL);
            }
            continue;
        }
        if (n < 0 && errno != EINTR) return 5;
        for (int i = 0; i < n; i++) {
            uint32_t data = evs[i].data.u32;
            if (data != UINT32_MAX && (data & CTL_BIT)) {
                on_ctl_ready(&conns[data & ~CTL_BIT], evs[i].events, scratch);
                continue;
            }
            if (data != UINT32_MAX) {
                on_ready(&conns[data], evs[i].events, scratch);
                continue;
            }
            for (;;) { /* the worker's commands */
                ssize_t r = read(0, cmd + cmd_len, sizeof cmd - 1 - cmd_len);
                if (r == 0) goto quit;
                if (r < 0) break;
                cmd_len += (size_t)r;
                char *nl;
                while ((nl = memchr(cmd, '\n', cmd_len))) {
                    *nl = 0;
                    if (!command(cmd)) goto quit;
                    size_t used = (size_t)(nl - cmd) + 1;
                    memmove(cmd, nl + 1, cmd_len - used);
                    cmd_len -= used;
                }
                if (cmd_len == sizeof cmd - 1) cmd_len = 0; /* no newline in 255 bytes: junk */
            }
        }
    }
quit:
    for (int i = 0; i < count; i++) {
        close_conn(&conns[i]);
        ctl_close(&conns[i]);
    }
    return 0;
}
