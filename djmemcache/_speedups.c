/*
 * djmemcache._speedups: one command's round trip on one or several
 * memcached connections, with the GIL released from the first send to the
 * last byte read.
 *
 * Why C: a pure-Python client holds the GIL through each send and through
 * parsing, and takes it back after every wait; with threads over several
 * servers that serialises what pylibmc runs in parallel (issue 11, see
 * docs/performance.rst). This module sends every connection its command,
 * waits for all replies in one poll, reads what is ready and splits each
 * reply into its items, all without the GIL; Python then maps the items to
 * keys, checks them and decodes them. It is optional: without it (no
 * compiler, DJMEMCACHE_PURE_PYTHON=1, gevent, TLS) connection.py does the
 * same in Python, and the test suite runs both.
 *
 * What the server says is never trusted, exactly as in connection.py: a
 * reply line is at most max_line bytes, a value at most max_value, at most
 * `count` values or lines per connection, nothing after the end of a reply,
 * and memory grows with the bytes received, never with what a server
 * declares. A deadline bounds the whole call; a reply still arriving at
 * deadline + timeout ends it. A signal ends a wait: its Python handler runs
 * (an exception from it is raised from here) and the wait goes on.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

/* What the Python side expects of this build (connection._load_speedups
 * checks it): bumped whenever a function is added or changes, so sources
 * updated without a rebuild fall back to pure Python instead of failing. */
#define API 5

enum { MODE_GET = 0, MODE_LINES = 1 };
enum { ST_SENDING, ST_READING, ST_DONE, ST_FAILED };
/* Failure kinds, as returned to Python (connection.py maps them). */
enum { F_ERRNO = 1, F_CLOSED, F_TIMEOUT, F_LATE, F_PROTOCOL, F_ERROR_LINE, F_NOMEM };

#define RECV_CHUNK 65536
#define SMALL 4
/* The longest wait between two looks for signals (BLOCKING_READ_SLICE in
 * connection.py, which sets the sockets' SO_RCVTIMEO to it). */
#define SLICE 0.040
#define SLICE_MS 40
/* At most this many recvs of one reply before the loop looks for signals
 * and the deadline again (a fast stream never makes read_ready wait). */
#define READS_PER_TURN 16
#define MESSAGE_SIZE 160

typedef struct {
    Py_ssize_t key, key_len, data, data_len;
    unsigned long long flags;
    Py_ssize_t flags_at, flags_len; /* the digits, when they overflow 64 bits */
    int flags_big;
    Py_ssize_t index;               /* which key asked for */
} item_t;

typedef struct {
    int fd, mode, blocks, state, failure, err;
    Py_ssize_t count;              /* values (get) or lines (lines) at most / exactly */
    const char *out;
    Py_ssize_t out_len, out_pos;
    char *buf;
    Py_ssize_t len, cap, pos;      /* received bytes; where parsing resumes */
    item_t *items;
    Py_ssize_t nitems;
    int in_block;                  /* items[nitems] waits for its data block */
    Py_ssize_t lines_end;          /* lines mode: end of the last complete line */
    Py_ssize_t error_at, error_len;/* F_ERROR_LINE: the line */
    /* get: the keys asked for (offsets into the command), an open-addressing
     * table of their indexes, and which have had their value: a VALUE line
     * for any other key, or a second one, fails the reply at that line. */
    Py_ssize_t *key_at, *key_len;
    Py_ssize_t *table;
    Py_ssize_t mask;
    char *seen;
    /* The same for a get of up to SMALL keys (most calls), without an
     * allocation each. */
    item_t small_items[SMALL];
    Py_ssize_t small_key_at[SMALL], small_key_len[SMALL], small_table[2 * SMALL];
    char small_seen[SMALL];
    char message[MESSAGE_SIZE];
    /* A get built from the caller's keys (init_get_keys): the keys, in the
     * order of the command, and the command, which is ours to free. */
    PyObject *keys;
    char *own_out;
} conn_t;

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void
fail(conn_t *c, int failure, int err, const char *message)
{
    c->state = ST_FAILED;
    c->failure = failure;
    c->err = err;
    if (message != NULL) {
        snprintf(c->message, MESSAGE_SIZE, "%s", message);
    }
}

/* 1-20 ASCII digits (no sign, space or underscore), as connection.py's _check_digits. */
static int
parse_digits(const char *s, Py_ssize_t n, unsigned long long *value, int *big)
{
    unsigned long long v = 0;
    Py_ssize_t i;
    if (n < 1 || n > 20) {
        return -1;
    }
    *big = 0;
    for (i = 0; i < n; i++) {
        unsigned d;
        if (s[i] < '0' || s[i] > '9') {
            return -1;
        }
        d = (unsigned)(s[i] - '0');
        if (v > (~0ULL - d) / 10) {
            *big = 1;
        }
        v = v * 10 + d;
    }
    *value = v;
    return 0;
}

static size_t
hash_bytes(const char *p, Py_ssize_t n)
{
    size_t h = 14695981039346656037ULL;  /* FNV-1a */
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    }
    return h;
}

/* Index of the key asked for that equals p[0:n], or -1. */
static Py_ssize_t
key_index(conn_t *c, const char *p, Py_ssize_t n)
{
    size_t slot = hash_bytes(p, n) & (size_t)c->mask;
    for (;; slot = (slot + 1) & (size_t)c->mask) {
        Py_ssize_t k = c->table[slot];
        if (k < 0) {
            return -1;
        }
        if (c->key_len[k] == n && memcmp(c->out + c->key_at[k], p, (size_t)n) == 0) {
            return k;
        }
    }
}

/* Parse a get reply from c->pos: VALUE lines and blocks up to END. */
static void
parse_get(conn_t *c, Py_ssize_t max_value, Py_ssize_t max_line)
{
    for (;;) {
        const char *buf = c->buf;
        if (c->in_block) {
            item_t *it = &c->items[c->nitems];
            Py_ssize_t end = it->data + it->data_len;
            if (c->len < end + 2) {
                return;
            }
            if (buf[end] != '\r' || buf[end + 1] != '\n') {
                fail(c, F_PROTOCOL, 0, "data block not followed by CRLF");
                return;
            }
            c->nitems++;
            c->in_block = 0;
            c->pos = end + 2;
            continue;
        }
        {
            Py_ssize_t pos = c->pos, eol, n, sp1, sp2, sp3, i;
            const char *line = buf + pos;
            const char *found = NULL;
            if (c->len > pos) {
                const char *p = line;
                const char *stop = buf + c->len;
                while ((p = memchr(p, '\r', stop - p)) != NULL) {
                    if (p + 1 < stop && p[1] == '\n') {
                        found = p;
                        break;
                    }
                    p++;
                }
            }
            if (found == NULL) {
                if (c->len - pos > max_line) {
                    fail(c, F_PROTOCOL, 0, NULL);
                    snprintf(c->message, MESSAGE_SIZE, "reply line longer than %zd bytes", max_line);
                }
                return;
            }
            eol = found - buf;
            n = eol - pos;
            if (n > max_line) {
                fail(c, F_PROTOCOL, 0, NULL);
                snprintf(c->message, MESSAGE_SIZE, "reply line longer than %zd bytes", max_line);
                return;
            }
            if (n == 3 && memcmp(line, "END", 3) == 0) {
                if (eol + 2 != c->len) {
                    fail(c, F_PROTOCOL, 0, "unexpected data after END");
                    return;
                }
                c->pos = eol + 2;
                c->state = ST_DONE;
                return;
            }
            if (!(n >= 5 && memcmp(line, "VALUE", 5) == 0 && (n == 5 || line[5] == ' '))) {
                c->error_at = pos;
                c->error_len = n;
                fail(c, F_ERROR_LINE, 0, NULL);
                return;
            }
            /* "VALUE <key> <flags> <length>": exactly four fields, one space apart. */
            sp1 = 5;
            sp2 = sp3 = -1;
            for (i = sp1 + 1; i < n; i++) {
                if (line[i] == ' ') {
                    if (sp2 < 0) {
                        sp2 = i;
                    }
                    else if (sp3 < 0) {
                        sp3 = i;
                    }
                    else {
                        sp3 = -2; /* a fifth field */
                        break;
                    }
                }
            }
            if (n == 5 || sp2 < 0 || sp3 < 0) {
                fail(c, F_PROTOCOL, 0, "malformed VALUE line");
                return;
            }
            {
                Py_ssize_t k = key_index(c, line + sp1 + 1, sp2 - sp1 - 1);
                if (k < 0 || c->seen[k] || c->nitems >= c->count) {
                    Py_ssize_t shown = sp2 - sp1 - 1 < 64 ? sp2 - sp1 - 1 : 64;
                    Py_ssize_t j;
                    fail(c, F_PROTOCOL, 0, NULL);
                    snprintf(c->message, MESSAGE_SIZE, "reply for a key not asked for: %.*s",
                             (int)shown, line + sp1 + 1);
                    for (j = 0; c->message[j]; j++) {
                        if ((unsigned char)c->message[j] < 0x20 || (unsigned char)c->message[j] > 0x7e) {
                            c->message[j] = '?';
                        }
                    }
                    return;
                }
                c->seen[k] = 1;
                c->items[c->nitems].index = k;
            }
            {
                item_t *it = &c->items[c->nitems];
                unsigned long long length;
                int big;
                if (parse_digits(line + sp2 + 1, sp3 - sp2 - 1, &it->flags, &it->flags_big) < 0) {
                    fail(c, F_PROTOCOL, 0, "flags is not a number");
                    return;
                }
                if (parse_digits(line + sp3 + 1, n - sp3 - 1, &length, &big) < 0) {
                    fail(c, F_PROTOCOL, 0, "value length is not a number");
                    return;
                }
                if (big || length > (unsigned long long)max_value) {
                    fail(c, F_PROTOCOL, 0, NULL);
                    snprintf(c->message, MESSAGE_SIZE,
                             "the server declares a %.*s-byte value (MAX_VALUE_SIZE is %zd)",
                             (int)(n - sp3 - 1), line + sp3 + 1, max_value);
                    return;
                }
                it->key = pos + sp1 + 1;
                it->key_len = sp2 - sp1 - 1;
                it->flags_at = pos + sp2 + 1;
                it->flags_len = sp3 - sp2 - 1;
                it->data = eol + 2;
                it->data_len = (Py_ssize_t)length;
                c->in_block = 1;
                c->pos = eol + 2;
            }
        }
    }
}

/* Lines mode: exactly `count` CRLF-ended lines, nothing after them. */
static void
parse_lines(conn_t *c, Py_ssize_t max_line)
{
    const char *buf = c->buf;
    Py_ssize_t pos = c->pos;
    while (c->nitems < c->count) {
        const char *p = buf + pos;
        const char *stop = buf + c->len;
        const char *found = NULL;
        while (p < stop && (p = memchr(p, '\r', stop - p)) != NULL) {
            if (p + 1 < stop && p[1] == '\n') {
                found = p;
                break;
            }
            p++;
        }
        if (found == NULL) {
            break;
        }
        c->nitems++;
        pos = found - buf + 2;
        c->lines_end = pos;
    }
    /* resume the search at the last byte seen (a CRLF may straddle two reads) */
    c->pos = c->nitems < c->count ? (c->len > pos ? c->len - 1 : pos) : pos;
    if (c->nitems < c->count) {
        if ((c->len - 1) / max_line >= c->count) {  /* len > count * max_line, no overflow */
            char message[MESSAGE_SIZE];
            snprintf(message, MESSAGE_SIZE, "reply longer than %zd lines allow", c->count);
            fail(c, F_PROTOCOL, 0, message);
        }
        return;
    }
    if (c->lines_end != c->len) {
        fail(c, F_PROTOCOL, 0, "unexpected data after reply");
        return;
    }
    c->state = ST_DONE;
}

/* One recv on c (MSG_DONTWAIT, or 0 to wait up to the socket's SO_RCVTIMEO),
 * and parse what came. Returns 1 when bytes came, 0 when none were there
 * (or the wait's slice ran out), EINTR for a signal; c failed otherwise. */
static int
receive(conn_t *c, int flags, double deadline, double timeout, Py_ssize_t max_value,
        Py_ssize_t max_line)
{
    ssize_t got;
    if (c->cap - c->len < RECV_CHUNK / 4) {
        /* Grows with the bytes received, never with a length declared: by
         * half, or to just what a data block still needs when that is at
         * most twice what has come (the values are copied out at the end,
         * so the buffer is most of the peak). */
        Py_ssize_t cap = c->cap ? c->cap + c->cap / 2 : RECV_CHUNK;
        if (c->in_block) {
            item_t *it = &c->items[c->nitems];
            Py_ssize_t need = it->data + it->data_len + 2 + RECV_CHUNK / 4;
            if (need > c->cap && need <= 2 * c->len) {
                cap = need;
            }
        }
        /* PyMem_Raw*: safe without the GIL, and seen by tracemalloc. */
        char *grown = PyMem_RawRealloc(c->buf, (size_t)cap);
        if (grown == NULL) {
            fail(c, F_NOMEM, 0, NULL);
            return -1;
        }
        c->buf = grown;
        c->cap = cap;
    }
    got = recv(c->fd, c->buf + c->len, (size_t)(c->cap - c->len), flags);
    if (got < 0) {
        int err = errno;
        if (err == EINTR) {
            return EINTR;
        }
        if (err == EAGAIN || err == EWOULDBLOCK) {
            return 0;
        }
        fail(c, F_ERRNO, err, NULL);
        return -1;
    }
    if (got == 0) {
        fail(c, F_CLOSED, 0, NULL);
        return -1;
    }
    c->len += got;
    if (c->mode == MODE_GET) {
        parse_get(c, max_value, max_line);
    }
    else {
        parse_lines(c, max_line);
    }
    if (c->state == ST_READING && deadline >= 0 && timeout >= 0 && now() > deadline + timeout) {
        /* Whatever the server declares, the call ends: a flood of lines
         * would otherwise hold it. */
        fail(c, F_LATE, 0, NULL);
    }
    return 1;
}

/* Read what is ready on c, without waiting. */
static void
read_ready(conn_t *c, double deadline, double timeout, Py_ssize_t max_value, Py_ssize_t max_line)
{
    int turns;
    for (turns = 0; turns < READS_PER_TURN && c->state == ST_READING; turns++) {
        int got = receive(c, MSG_DONTWAIT, deadline, timeout, max_value, max_line);
        if (got == 0 || got < 0) {
            return;
        }
    }
}

static void
send_some(conn_t *c)
{
    while (c->out_pos < c->out_len) {
        ssize_t sent = send(c->fd, c->out + c->out_pos, (size_t)(c->out_len - c->out_pos),
                            MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                fail(c, F_ERRNO, errno, NULL);
            }
            return;
        }
        c->out_pos += sent;
    }
    c->state = ST_READING;
}

/* Take the GIL, run the Python handlers of signals received meanwhile, and
 * let it go again; -1 (GIL held, exception set) when a handler raised. */
static int
check_signals(PyThreadState **ts)
{
    PyEval_RestoreThread(*ts);
    if (PyErr_CheckSignals() < 0) {
        return -1;
    }
    *ts = PyEval_SaveThread();
    return 0;
}

/* The round trips of every connection; 0, or -1 with a Python exception set
 * (a signal handler's). Called and returns with the GIL held.
 *
 * Signals: a wait that a signal interrupts (EINTR) runs its handler at
 * once; a signal that arrives while this code is not waiting (sending,
 * reading a long reply) is looked for at least every SLICE, since every
 * wait is at most that long. */
static int
run(conn_t *conns, Py_ssize_t n, double deadline, double timeout,
    Py_ssize_t max_value, Py_ssize_t max_line, double min_blocking)
{
    int may_block = 1;
    struct pollfd stack_fds[8];
    struct pollfd *fds = stack_fds;
    Py_ssize_t *which, stack_which[8];
    Py_ssize_t i;
    int result = 0;
    double checked;
    PyThreadState *ts;

    which = stack_which;
    if (n > 8) {
        fds = PyMem_Malloc(sizeof(*fds) * (size_t)n);
        which = PyMem_Malloc(sizeof(*which) * (size_t)n);
        if (fds == NULL || which == NULL) {
            PyMem_Free(fds);
            PyMem_Free(which);
            PyErr_NoMemory();
            return -1;
        }
    }
    ts = PyEval_SaveThread();
    checked = now();
    for (i = 0; i < n; i++) {
        send_some(&conns[i]);
    }
    for (;;) {
        Py_ssize_t active = 0;
        int wait_ms, ready, late = 0;
        conn_t *last = NULL;
        double t = now();
        if (t - checked >= SLICE) {
            if (check_signals(&ts) < 0) {
                result = -1;
                goto out;
            }
            checked = t = now();  /* taking the GIL back, or a handler, took time */
        }
        for (i = 0; i < n; i++) {
            conn_t *c = &conns[i];
            if (c->state == ST_SENDING || c->state == ST_READING) {
                fds[active].fd = c->fd;
                /* A reply is read once its command is all sent, as connection.py
                 * does (memcached queues what it writes meanwhile). */
                fds[active].events = c->state == ST_SENDING ? POLLOUT : POLLIN;
                fds[active].revents = 0;
                which[active++] = i;
                last = c;
            }
        }
        if (active == 0) {
            break;
        }
        if (active == 1 && last->state == ST_READING && last->blocks && may_block) {
            /* One reply left (a one-server command, or the last server of a
             * pipeline): wait for it in one blocking recv bounded by the
             * socket's SO_RCVTIMEO (BLOCKING_READ_SLICE), one syscall where
             * poll + recv made two. With several replies left, poll waits for
             * all at once: a slow server must not keep a fast one's large
             * reply unread until the deadline. A signal ends the wait (with
             * SO_RCVTIMEO set, even after an SA_RESTART handler). Only with
             * BLOCKING_READ_MIN_TIMEOUT left: the kernel counts in ticks. */
            int got;
            if (deadline >= 0 && deadline - t < min_blocking) {
                may_block = 0;  /* poll waits out the rest */
                continue;
            }
            got = receive(last, 0, deadline, timeout, max_value, max_line);
            if (got == EINTR) {
                if (check_signals(&ts) < 0) {
                    result = -1;
                    goto out;
                }
                checked = now();
            }
            else if (got == 0 && now() - t < SLICE / 4) {
                /* The slice over long before its time: the socket does not
                 * block (no SO_RCVTIMEO), so poll must do the waiting. */
                may_block = 0;
            }
            continue;
        }
        if (deadline < 0) {
            wait_ms = SLICE_MS;
        }
        else {
            /* Past the deadline it still looks once without waiting: a reply
             * already there was late only because this process was. */
            double left = deadline - t;
            late = left <= 0;
            wait_ms = late ? 0 : (left >= SLICE ? SLICE_MS : (int)ceil(left * 1000));
        }
        ready = poll(fds, (nfds_t)active, wait_ms);
        if (ready < 0) {
            int err = errno;
            if (err == EINTR) {
                if (check_signals(&ts) < 0) {
                    result = -1;
                    goto out;
                }
                checked = now();
                continue;
            }
            for (i = 0; i < active; i++) {
                fail(&conns[which[i]], F_ERRNO, err, NULL);
            }
            break;
        }
        if (ready == 0) {
            if (late) {
                for (i = 0; i < active; i++) {
                    fail(&conns[which[i]], F_TIMEOUT, 0, NULL);
                }
                break;
            }
            continue;
        }
        for (i = 0; i < active; i++) {
            conn_t *c = &conns[which[i]];
            short revents = fds[i].revents;
            if (revents == 0) {
                continue;
            }
            if (c->state == ST_SENDING) {
                send_some(c);
            }
            else if (c->state == ST_READING) {
                read_ready(c, deadline, timeout, max_value, max_line);
            }
            if ((revents & POLLNVAL) && (c->state == ST_SENDING || c->state == ST_READING)) {
                fail(c, F_ERRNO, EBADF, NULL);
            }
        }
    }
    PyEval_RestoreThread(ts);
out:
    if (fds != stack_fds) {
        PyMem_Free(fds);
        PyMem_Free(which);
    }
    return result;
}

static PyObject *
flags_object(conn_t *c, item_t *it)
{
    if (!it->flags_big) {
        return PyLong_FromUnsignedLongLong(it->flags);
    }
    {
        char digits[24];
        memcpy(digits, c->buf + it->flags_at, (size_t)it->flags_len);
        digits[it->flags_len] = '\0';
        return PyLong_FromString(digits, NULL, 10);
    }
}

/* The values of a get of the caller's keys (init_get_keys), as
 * key: (data, flags) in `into`; returns (hits, misses) of the keys asked
 * for (a key given twice was asked once). */
static PyObject *
found_values(conn_t *c, PyObject *into)
{
    Py_ssize_t i;
    for (i = 0; i < c->nitems; i++) {
        item_t *it = &c->items[i];
        PyObject *flags = flags_object(c, it);
        PyObject *value;
        int failed;
        if (flags == NULL) {
            return NULL;
        }
        value = Py_BuildValue("(y#N)", c->buf + it->data, it->data_len, flags);
        if (value == NULL) {
            return NULL;
        }
        failed = PyDict_SetItem(into, PyList_GET_ITEM(c->keys, it->index), value);
        Py_DECREF(value);
        if (failed < 0) {
            return NULL;
        }
    }
    return Py_BuildValue("(nn)", c->nitems, c->count - c->nitems);
}

/* What Python gets for one connection: on success, a list (get: (wire,
 * flags, data) tuples; lines: the lines), or for a get of the caller's keys
 * (hits, misses), the values being in `into`; else a (kind, errno, detail)
 * tuple. */
static PyObject *
outcome(conn_t *c, PyObject *into)
{
    Py_ssize_t i;
    PyObject *list;
    if (c->state == ST_FAILED) {
        if (c->failure == F_ERROR_LINE) {
            return Py_BuildValue("(iiy#)", c->failure, 0, c->buf + c->error_at, c->error_len);
        }
        return Py_BuildValue("(iis)", c->failure, c->err, c->message);
    }
    if (c->keys != NULL) {
        return found_values(c, into);
    }
    list = PyList_New(c->nitems);
    if (list == NULL) {
        return NULL;
    }
    if (c->mode == MODE_GET) {
        for (i = 0; i < c->nitems; i++) {
            item_t *it = &c->items[i];
            PyObject *flags = flags_object(c, it);
            PyObject *item;
            if (flags == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            item = Py_BuildValue("(y#Ny#)", c->buf + it->key, it->key_len, flags,
                                 c->buf + it->data, it->data_len);
            if (item == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, i, item);
        }
    }
    else {
        Py_ssize_t start = 0;
        for (i = 0; i < c->nitems; i++) {
            const char *p = c->buf + start;
            const char *eol = NULL;
            PyObject *line;
            while ((p = memchr(p, '\r', (size_t)(c->len - (p - c->buf)))) != NULL) {
                if (p + 1 < c->buf + c->len && p[1] == '\n') {
                    eol = p;
                    break;
                }
                p++;
            }
            line = PyBytes_FromStringAndSize(c->buf + start, eol - (c->buf + start));
            if (line == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, i, line);
            start = eol - c->buf + 2;
        }
    }
    return list;
}

/* max_value and max_line as the parsers need them (max_line divides). */
static int
check_limits(Py_ssize_t max_value, Py_ssize_t max_line)
{
    if (max_value < 0 || max_line < 1) {
        PyErr_SetString(PyExc_ValueError, "max_value must be >= 0 and max_line >= 1");
        return -1;
    }
    return 0;
}

static double
deadline_arg(PyObject *o)
{
    if (o == Py_None) {
        return -1.0;
    }
    return PyFloat_AsDouble(o);
}

static void
free_conns(conn_t *conns, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        conn_t *c = &conns[i];
        PyMem_RawFree(c->buf);
        PyMem_Free(c->own_out);
        Py_XDECREF(c->keys);
        if (c->items != c->small_items) {
            PyMem_Free(c->items);
            PyMem_Free(c->key_at);
            PyMem_Free(c->key_len);
            PyMem_Free(c->table);
            PyMem_Free(c->seen);
        }
    }
}

/* Room for c->count keys and their items, and an empty key table. */
static int
alloc_keys(conn_t *c)
{
    Py_ssize_t size = 8, i;
    if (c->count <= SMALL) {
        size = 2 * SMALL;
        c->items = c->small_items;
        c->key_at = c->small_key_at;
        c->key_len = c->small_key_len;
        c->table = c->small_table;
        c->seen = c->small_seen;
        memset(c->seen, 0, SMALL);
    }
    else {
        while (size < 2 * c->count) {
            size *= 2;
        }
        c->items = PyMem_New(item_t, c->count);
        c->key_at = PyMem_New(Py_ssize_t, c->count);
        c->key_len = PyMem_New(Py_ssize_t, c->count);
        c->table = PyMem_New(Py_ssize_t, size);
        c->seen = PyMem_Calloc((size_t)c->count, 1);
        if (c->items == NULL || c->key_at == NULL || c->key_len == NULL || c->table == NULL
                || c->seen == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    c->mask = size - 1;
    for (i = 0; i < size; i++) {
        c->table[i] = -1;
    }
    return 0;
}

/* Key k of the get is c->out[start:start + len]: into the table. */
static void
add_key(conn_t *c, Py_ssize_t k, Py_ssize_t start, Py_ssize_t len)
{
    size_t slot = hash_bytes(c->out + start, len) & (size_t)c->mask;
    while (c->table[slot] >= 0) {
        slot = (slot + 1) & (size_t)c->mask;
    }
    c->key_at[k] = start;
    c->key_len[k] = len;
    c->table[slot] = k;
}

/* get: the keys of the command "get <key> <key> ...\r\n", `count` of them. */
static int
init_keys(conn_t *c)
{
    const char *cmd = c->out;
    Py_ssize_t end = c->out_len, pos, k = 0;
    if (end >= 2 && cmd[end - 2] == '\r' && cmd[end - 1] == '\n') {
        end -= 2;
    }
    pos = 0;
    while (pos < end && cmd[pos] != ' ') {  /* the command word */
        pos++;
    }
    if (alloc_keys(c) < 0) {
        return -1;
    }
    while (pos < end) {
        Py_ssize_t start = ++pos;  /* past the space */
        while (pos < end && cmd[pos] != ' ') {
            pos++;
        }
        if (k == c->count) {
            k++;  /* more keys than count: refused below */
            break;
        }
        add_key(c, k++, start, pos - start);
    }
    if (k != c->count) {
        PyErr_SetString(PyExc_ValueError, "count is not the number of keys in the get command");
        return -1;
    }
    return 0;
}

/* The fields every request sets, before its command and keys. */
static void
begin_conn(conn_t *c, int fd, int mode, Py_ssize_t count, int blocks)
{
    c->fd = fd;
    c->mode = mode;
    c->blocks = blocks;
    c->count = count;
    c->state = ST_SENDING;
}

static int
init_conn(conn_t *c, int fd, PyObject *command, int mode, Py_ssize_t count, int blocks)
{
    char *data;
    Py_ssize_t size;
    memset(c, 0, sizeof(*c));
    if (PyBytes_AsStringAndSize(command, &data, &size) < 0) {
        return -1;
    }
    if (count < 1 || (mode != MODE_GET && mode != MODE_LINES)) {
        PyErr_SetString(PyExc_ValueError, "bad mode or count");
        return -1;
    }
    if (mode == MODE_GET && count > size) {  /* a key takes at least a byte */
        PyErr_SetString(PyExc_ValueError, "count is not the number of keys in the get command");
        return -1;
    }
    begin_conn(c, fd, mode, count, blocks);
    c->out = data;
    c->out_len = size;
    if (mode == MODE_GET) {
        return init_keys(c);
    }
    return 0;
}

/* A get of the caller's keys (str), each once: "get <prefix><key> ...\r\n"
 * is built here, and the outcome maps values back to these keys, which
 * saves Python a pass over the keys before the call and one after it. A
 * key given twice is asked for once (memcached would answer it twice). */
static int
init_get_keys(conn_t *c, int fd, PyObject *prefix, PyObject *keys, int blocks)
{
    char *pre, *out;
    Py_ssize_t pre_len, n, i, cap, len, k = 0;
    memset(c, 0, sizeof(*c));
    if (PyBytes_AsStringAndSize(prefix, &pre, &pre_len) < 0) {
        return -1;
    }
    if (!PyList_Check(keys) && !PyTuple_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a list or tuple of str");
        return -1;
    }
    n = PySequence_Fast_GET_SIZE(keys);
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "a get asks for at least one key");
        return -1;
    }
    c->keys = PyList_New(0);
    if (c->keys == NULL) {
        return -1;
    }
    begin_conn(c, fd, MODE_GET, n, blocks);
    if (alloc_keys(c) < 0) {
        return -1;
    }
    cap = 5 + n * (pre_len + 24);
    /* c->out is the command as far as it is built: key_index reads keys there. */
    c->out = out = c->own_out = PyMem_Malloc((size_t)cap);
    if (out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(out, "get", 3);
    len = 3;
    for (i = 0; i < n; i++) {
        /* Read with the GIL held: the list may not change meanwhile. */
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        const char *text;
        Py_ssize_t text_len, start, key_len, need;
        if (!PyUnicode_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "keys must be str");
            return -1;
        }
        text = PyUnicode_AsUTF8AndSize(key, &text_len);
        if (text == NULL) {
            return -1;
        }
        need = len + 1 + pre_len + text_len + 2;
        if (need > cap) {
            char *grown;
            cap = need * 2;
            grown = PyMem_Realloc(out, (size_t)cap);
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            c->out = out = c->own_out = grown;
        }
        out[len++] = ' ';
        start = len;
        memcpy(out + len, pre, (size_t)pre_len);
        memcpy(out + len + pre_len, text, (size_t)text_len);
        key_len = pre_len + text_len;
        if (key_index(c, out + start, key_len) >= 0) {  /* asked already */
            len = start - 1;
            continue;
        }
        if (PyList_Append(c->keys, key) < 0) {
            return -1;
        }
        add_key(c, k++, start, key_len);
        len += key_len;
    }
    out[len++] = '\r';
    out[len++] = '\n';
    c->count = k;
    c->out_len = len;
    return 0;
}

PyDoc_STRVAR(exchange_doc,
"exchange(fd, command, mode, count, blocks, deadline, timeout, max_value, max_line, min_blocking)\n\n"
"Send ``command`` on ``fd`` and read its whole reply with the GIL released.\n"
"``blocks``: the socket has SO_RCVTIMEO set, so a blocking recv may wait.");

static PyObject *
exchange(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd, mode, blocks;
    Py_ssize_t count, max_value, max_line;
    PyObject *command, *deadline_o, *timeout_o, *result = NULL;
    double deadline, timeout, min_blocking;
    conn_t conn;
    if (!PyArg_ParseTuple(args, "iSinpOOnnd", &fd, &command, &mode, &count, &blocks,
                          &deadline_o, &timeout_o, &max_value, &max_line, &min_blocking)) {
        return NULL;
    }
    deadline = deadline_arg(deadline_o);
    timeout = deadline_arg(timeout_o);
    if (PyErr_Occurred() || check_limits(max_value, max_line) < 0) {
        return NULL;
    }
    if (init_conn(&conn, fd, command, mode, count, blocks) < 0) {
        free_conns(&conn, 1);
        return NULL;
    }
    /* `args` keeps the command's bytes alive while they are sent without the GIL. */
    if (run(&conn, 1, deadline, timeout, max_value, max_line, min_blocking) == 0) {
        result = outcome(&conn, NULL);
    }
    free_conns(&conn, 1);
    return result;
}

PyDoc_STRVAR(exchange_many_doc,
"exchange_many(requests, deadline, timeout, max_value, max_line, min_blocking, into=None)\n\n"
"``requests``: a list of (fd, command, mode, count, blocks), or (fd, prefix, keys,\n"
"blocks) for a get of ``keys`` (str) whose values go into the dict ``into`` (its\n"
"outcome: (hits, misses));\n"
"every command is sent, then every reply read, in one release of the GIL.\n"
"One outcome per request.");

static PyObject *
exchange_many(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *requests, *deadline_o, *timeout_o, *seq, *result = NULL, *into = Py_None;
    Py_ssize_t n, i, max_value, max_line;
    double deadline, timeout, min_blocking;
    conn_t *conns;
    if (!PyArg_ParseTuple(args, "OOOnnd|O", &requests, &deadline_o, &timeout_o, &max_value,
                          &max_line, &min_blocking, &into)) {
        return NULL;
    }
    deadline = deadline_arg(deadline_o);
    timeout = deadline_arg(timeout_o);
    if (PyErr_Occurred() || check_limits(max_value, max_line) < 0) {
        return NULL;
    }
    /* A tuple of its own: the caller's list may change while the GIL is
     * released, and the commands' bytes must stay alive. */
    seq = PySequence_Tuple(requests);
    if (seq == NULL) {
        return NULL;
    }
    n = PyTuple_GET_SIZE(seq);
    conns = PyMem_Calloc(n ? (size_t)n : 1, sizeof(conn_t));
    if (conns == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (i = 0; i < n; i++) {
        int fd, mode, blocks;
        Py_ssize_t count;
        PyObject *command;
        PyObject *request = PyTuple_GET_ITEM(seq, i);
        if (!PyTuple_Check(request)) {
            PyErr_SetString(PyExc_TypeError, "a request is a (fd, command, mode, count, blocks) tuple");
            goto done;
        }
        if (PyTuple_GET_SIZE(request) == 4) {
            PyObject *prefix, *keys;
            if (!PyDict_CheckExact(into)) {
                PyErr_SetString(PyExc_TypeError, "a get of keys needs a dict to put the values in");
                goto done;
            }
            if (!PyArg_ParseTuple(request, "iSOp", &fd, &prefix, &keys, &blocks)
                || init_get_keys(&conns[i], fd, prefix, keys, blocks) < 0) {
                goto done;
            }
            continue;
        }
        if (!PyArg_ParseTuple(request, "iSinp", &fd, &command, &mode,
                              &count, &blocks)
            || init_conn(&conns[i], fd, command, mode, count, blocks) < 0) {
            goto done;
        }
    }
    /* `seq` holds every request, so every command, while the GIL is released. */
    if (run(conns, n, deadline, timeout, max_value, max_line, min_blocking) < 0) {
        goto done;
    }
    result = PyList_New(n);
    if (result == NULL) {
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *one = outcome(&conns[i], into);
        if (one == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, one);
    }
done:
    free_conns(conns, n);
    PyMem_Free(conns);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(stale_doc,
"stale(fd)\n\n"
"True when an idle connection has something to read (the server's close,\n"
"an error, or bytes nobody asked for): one non-blocking peek, keeping the\n"
"GIL (it cannot wait), for the pool's check of connections idle a while.");

/* 1 when an idle socket has something to read (a close, an error, bytes). */
static int
peek_stale(int fd)
{
    char byte;
    ssize_t got;
    do {
        got = recv(fd, &byte, 1, MSG_DONTWAIT | MSG_PEEK);
    } while (got < 0 && errno == EINTR);
    return got >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
}

static PyObject *
stale(PyObject *Py_UNUSED(self), PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return NULL;
    }
    return PyBool_FromLong(peek_stale((int)fd));
}

/* -- Placement: pymemcache's RendezvousHash, as servers.Rendezvous computes it --
 *
 * Each live server's score for a key is murmur3_32 (x86, seed 0) of
 * "<node>-<key>"; the highest wins, ties going to the server listed first
 * in `scored` (servers.py orders them by its tie-break). The key's bytes are
 * its characters' code points & 0xFF, as pymemcache's pure-Python murmur3
 * reads them (servers._hash_key_bytes). In C because a multi-key call
 * places every key: one Python loop body per key per server, where this is
 * a few nanoseconds. */

static uint32_t
rotl32(uint32_t x, int r)
{
    return (x << r) | (x >> (32 - r));
}

static uint32_t
murmur3_32(const unsigned char *data, Py_ssize_t len)
{
    const uint32_t c1 = 0xcc9e2d51, c2 = 0x1b873593;
    uint32_t h = 0, k;
    Py_ssize_t i, blocks = len / 4;
    for (i = 0; i < blocks; i++) {
        const unsigned char *b = data + 4 * i;
        k = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
        k *= c1;
        k = rotl32(k, 15);
        k *= c2;
        h ^= k;
        h = rotl32(h, 13);
        h = h * 5 + 0xe6546b64;
    }
    k = 0;
    switch (len & 3) {
    case 3:
        k ^= (uint32_t)data[4 * blocks + 2] << 16;
        /* fall through */
    case 2:
        k ^= (uint32_t)data[4 * blocks + 1] << 8;
        /* fall through */
    case 1:
        k ^= (uint32_t)data[4 * blocks];
        k *= c1;
        k = rotl32(k, 15);
        k *= c2;
        h ^= k;
    }
    h ^= (uint32_t)len;
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

#define PLACE_STACK 512

/* The index object of the winning entry of `scored` (a tuple of (prefix,
 * index) tuples, checked by the caller) for `key`; borrowed, or NULL with
 * an exception set. */
static PyObject *
place_one(PyObject *key, PyObject *scored, unsigned char *stack)
{
    Py_ssize_t key_len, n = PyTuple_GET_SIZE(scored), i, most = 0;
    unsigned char *buf = stack;
    PyObject *best = NULL;
    uint32_t best_score = 0;
    if (!PyUnicode_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "keys must be str");
        return NULL;
    }
    key_len = PyUnicode_GET_LENGTH(key);
    for (i = 0; i < n; i++) {
        Py_ssize_t len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(PyTuple_GET_ITEM(scored, i), 0));
        if (len > most) {
            most = len;
        }
    }
    if (most + key_len > PLACE_STACK) {
        buf = PyMem_Malloc((size_t)(most + key_len));
        if (buf == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
    }
    for (i = 0; i < n; i++) {
        PyObject *entry = PyTuple_GET_ITEM(scored, i);
        PyObject *prefix = PyTuple_GET_ITEM(entry, 0);
        Py_ssize_t pre_len = PyBytes_GET_SIZE(prefix), j;
        uint32_t score;
        /* The key goes right after this prefix (prefixes differ in length). */
        memcpy(buf, PyBytes_AS_STRING(prefix), (size_t)pre_len);
        if (PyUnicode_IS_ASCII(key)) {
            memcpy(buf + pre_len, PyUnicode_DATA(key), (size_t)key_len);
        }
        else {
            int kind = PyUnicode_KIND(key);
            const void *data = PyUnicode_DATA(key);
            for (j = 0; j < key_len; j++) {
                buf[pre_len + j] = (unsigned char)(PyUnicode_READ(kind, data, j) & 0xFF);
            }
        }
        score = murmur3_32(buf, pre_len + key_len);
        if (best == NULL || score > best_score) {
            best = PyTuple_GET_ITEM(entry, 1);
            best_score = score;
        }
    }
    if (buf != stack) {
        PyMem_Free(buf);
    }
    return best;
}

/* `scored` as a tuple of (bytes, object) pairs, at least one; new reference. */
static PyObject *
scored_arg(PyObject *scored)
{
    Py_ssize_t i;
    if (!PyTuple_Check(scored) || PyTuple_GET_SIZE(scored) < 1) {
        PyErr_SetString(PyExc_TypeError, "scored must be a non-empty tuple of (prefix, index) pairs");
        return NULL;
    }
    for (i = 0; i < PyTuple_GET_SIZE(scored); i++) {
        PyObject *entry = PyTuple_GET_ITEM(scored, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2
                || !PyBytes_Check(PyTuple_GET_ITEM(entry, 0))) {
            PyErr_SetString(PyExc_TypeError, "scored must be a non-empty tuple of (prefix, index) pairs");
            return NULL;
        }
    }
    Py_INCREF(scored);
    return scored;
}

PyDoc_STRVAR(choose_doc,
"choose(key, scored)\n\n"
"The index of the server ``key`` goes to: ``scored`` is a tuple of\n"
"(b\"<node>-\", index) pairs in tie-break order (servers.Rendezvous).");

static PyObject *
choose(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *key, *scored, *best;
    unsigned char stack[PLACE_STACK];
    if (!PyArg_ParseTuple(args, "OO", &key, &scored) || (scored = scored_arg(scored)) == NULL) {
        return NULL;
    }
    best = place_one(key, scored, stack);
    Py_XINCREF(best);
    Py_DECREF(scored);
    return best;
}

PyDoc_STRVAR(group_doc,
"group(keys, scored)\n\n"
"``{index: [keys]}``: ``choose`` for every key, the keys in their order.");

static PyObject *
group(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *keys, *scored, *seq, *groups;
    Py_ssize_t i;
    unsigned char stack[PLACE_STACK];
    if (!PyArg_ParseTuple(args, "OO", &keys, &scored) || (scored = scored_arg(scored)) == NULL) {
        return NULL;
    }
    seq = PySequence_Fast(keys, "keys must be a sequence");
    groups = seq == NULL ? NULL : PyDict_New();
    if (groups == NULL) {
        Py_XDECREF(seq);
        Py_DECREF(scored);
        return NULL;
    }
    for (i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *index = place_one(key, scored, stack);
        PyObject *members;
        if (index == NULL) {
            goto fail;
        }
        members = PyDict_GetItemWithError(groups, index);
        if (members == NULL) {
            if (PyErr_Occurred()) {
                goto fail;
            }
            members = PyList_New(0);
            if (members == NULL || PyDict_SetItem(groups, index, members) < 0) {
                Py_XDECREF(members);
                goto fail;
            }
            Py_DECREF(members);  /* the dict holds it */
        }
        if (PyList_Append(members, key) < 0) {
            goto fail;
        }
    }
    Py_DECREF(seq);
    Py_DECREF(scored);
    return groups;
fail:
    Py_DECREF(groups);
    Py_DECREF(seq);
    Py_DECREF(scored);
    return NULL;
}

/* -- The pool's common path: an idle connection out, a used one back --------
 *
 * pool.py's HostPool.acquire and release, for the case every call of a busy
 * site takes: a connection idle less than STALE_CHECK_AFTER, given back with
 * nobody waiting. Each pair is two C calls instead of about 120 bytecodes
 * run under the GIL (issue 11, sixth round). Anything else (an empty idle
 * list, a connection to look at again, waiters, a fork) returns None or
 * False and the caller takes the Python path, which does it all.
 *
 * Why no lock is taken: these run with the GIL held from start to end and
 * run no Python code (attribute reads and writes of plain instances, ints,
 * floats, a list), so no other thread runs meanwhile; and they act only when
 * the pool's lock is free, so no thread is part-way through the Python
 * path's bookkeeping either. Only with a plain _thread.lock, whose locked()
 * is C, and only for exactly the classes pool.py registers (pool_types):
 * a subclass's property or override would run Python code, another thread
 * could run meanwhile, and one connection could go to two callers (so a
 * property monkeypatched onto Connection itself would break this too). A
 * build without the GIL never takes this path. */

static PyObject *s_lock, *s_locked, *s_idle, *s_waiters, *s_check_after, *s_pid, *s_pool_pid;
static PyObject *s_sock, *s_idle_since, *s_pooled, *s_reused, *s_hits, *s_misses;
static PyObject *s_key_prefix, *s_fd, *s_timeout, *s_max_value_size, *s_first_read_blocks, *one;
static PyObject *s_native, *s_native_get, *s_discard, *s_release, *s_idle_timeout;
static PyObject *pool_type, *conn_type;  /* pool.HostPool and connection.Connection */

PyDoc_STRVAR(pool_types_doc,
"pool_types(pool_class, connection_class)\n\n"
"The only classes pool_take and pool_give act on (pool.py registers them).");

static PyObject *
pool_types(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *pool_class, *conn_class;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &pool_class, &PyType_Type, &conn_class)) {
        return NULL;
    }
    Py_XSETREF(pool_type, Py_NewRef(pool_class));
    Py_XSETREF(conn_type, Py_NewRef(conn_class));
    Py_RETURN_NONE;
}

PyDoc_STRVAR(monotonic_doc,
"monotonic() -> float\n\n"
"The clock pool_give stamps connections with (CLOCK_MONOTONIC, as\n"
"time.monotonic), for pool.py to read the same one: a test's fake clock\n"
"(freezegun) replaces time.monotonic, and two clocks would make every\n"
"idle time wrong.");

static PyObject *
monotonic(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored))
{
    return PyFloat_FromDouble(now());
}

/* 1 when no thread holds the pool's lock, 0 when the Python path must run. */
static int
pool_quiet(PyObject *pool)
{
#ifdef Py_GIL_DISABLED
    (void)pool;
    return 0;
#else
    PyObject *lock, *held;
    int quiet;
    lock = PyObject_GetAttr(pool, s_lock);
    if (lock == NULL) {
        return -1;
    }
    if (strcmp(Py_TYPE(lock)->tp_name, "_thread.lock") != 0) {
        Py_DECREF(lock);
        return 0;
    }
    held = PyObject_CallMethodNoArgs(lock, s_locked);
    Py_DECREF(lock);
    if (held == NULL) {
        return -1;
    }
    quiet = held == Py_False;
    Py_DECREF(held);
    return quiet;
#endif
}

static int
attr_double(PyObject *obj, PyObject *name, double *out)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    *out = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* A connection's socket (its _fd), or -1 with an exception. */
static int
conn_fd(PyObject *conn, int *fd)
{
    PyObject *attr = PyObject_GetAttr(conn, s_fd);
    long value;
    if (attr == NULL) {
        return -1;
    }
    value = PyLong_AsLong(attr);
    Py_DECREF(attr);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < INT_MIN || value > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return -1;
    }
    *fd = (int)value;
    return 0;
}

/* What a round trip on a connection needs of it: its socket, key prefix
 * (a new reference) and whether its first read may block. */
static int
conn_io(PyObject *conn, int *fd, PyObject **prefix, int *blocks)
{
    PyObject *attr;
    if (conn_fd(conn, fd) < 0 || (attr = PyObject_GetAttr(conn, s_first_read_blocks)) == NULL) {
        return -1;
    }
    *blocks = PyObject_IsTrue(attr);
    Py_DECREF(attr);
    if (*blocks < 0 || (*prefix = PyObject_GetAttr(conn, s_key_prefix)) == NULL) {
        return -1;
    }
    if (!PyBytes_Check(*prefix)) {
        Py_CLEAR(*prefix);
        PyErr_SetString(PyExc_TypeError, "key_prefix must be bytes");
        return -1;
    }
    return 0;
}

/* A connection's MAX_VALUE_SIZE and TIMEOUT (*timeout -1.0 for None). */
static int
conn_limits(PyObject *conn, Py_ssize_t max_line, Py_ssize_t *max_value, double *timeout)
{
    PyObject *attr = PyObject_GetAttr(conn, s_max_value_size);
    if (attr == NULL) {
        return -1;
    }
    *max_value = PyLong_AsSsize_t(attr);
    Py_DECREF(attr);
    if ((*max_value == -1 && PyErr_Occurred()) || check_limits(*max_value, max_line) < 0
        || (attr = PyObject_GetAttr(conn, s_timeout)) == NULL) {
        return -1;
    }
    *timeout = deadline_arg(attr);
    Py_DECREF(attr);
    return PyErr_Occurred() ? -1 : 0;
}

/* 1 when conn, idle for `idle` seconds, may be used after one look at its
 * socket (nothing to read: not closed by the server); 0 when the pool's
 * Python path must look at it (and reconnect it). */
static int
idle_peek(PyObject *pool, PyObject *conn, double idle)
{
    PyObject *attr;
    int native, limited;
    double limit = 0.0;
    int fd;
    if ((attr = PyObject_GetAttr(conn, s_native)) == NULL) {
        return -1;
    }
    native = PyObject_IsTrue(attr);
    Py_DECREF(attr);
    if (native <= 0) {
        return native;
    }
    if ((attr = PyObject_GetAttr(pool, s_idle_timeout)) == NULL) {
        return -1;
    }
    limited = PyObject_IsTrue(attr);
    if (limited > 0) {
        limit = PyFloat_AsDouble(attr);
        if (limit == -1.0 && PyErr_Occurred()) {
            limited = -1;
        }
    }
    Py_DECREF(attr);
    if (limited < 0) {
        return -1;
    }
    if (limited && !(idle <= limit)) {
        return 0;
    }
    if (conn_fd(conn, &fd) < 0) {
        return -1;
    }
    return !peek_stale(fd);
}

PyDoc_STRVAR(pool_take_doc,
"pool_take(pool) -> connection or None\n\n"
"HostPool.acquire's common path: the idle connection used last, if it has\n"
"been idle less than the pool's _check_after, or longer but one look at\n"
"its socket finds it open (through this module, within IDLE_TIMEOUT);\n"
"None when acquire() must run.");

static PyObject *
take_conn(PyObject *pool)
{
    PyObject *idle = NULL, *conn = NULL, *sock;
    Py_ssize_t n;
    double since, check_after, idle_for;
    int quiet, connected;
    if ((PyObject *)Py_TYPE(pool) != pool_type) {
        Py_RETURN_NONE;
    }
    quiet = pool_quiet(pool);
    if (quiet <= 0) {
        return quiet < 0 ? NULL : Py_NewRef(Py_None);
    }
    idle = PyObject_GetAttr(pool, s_idle);
    if (idle == NULL) {
        return NULL;
    }
    if (!PyList_CheckExact(idle) || (n = PyList_GET_SIZE(idle)) == 0) {
        goto slow;
    }
    conn = Py_NewRef(PyList_GET_ITEM(idle, n - 1));
    if ((PyObject *)Py_TYPE(conn) != conn_type) {
        goto slow;
    }
    sock = PyObject_GetAttr(conn, s_sock);
    if (sock == NULL) {
        goto fail;
    }
    connected = sock != Py_None;
    Py_DECREF(sock);
    if (!connected) {
        goto slow;
    }
    if (attr_double(conn, s_idle_since, &since) < 0 || attr_double(pool, s_check_after, &check_after) < 0) {
        goto fail;
    }
    idle_for = now() - since;
    if (!(idle_for < check_after)) {
        /* Idle a while: the server may have closed it. HostPool._refresh's
         * look, when it is one peek (a connection through this module, and
         * no IDLE_TIMEOUT it has outlived); a closed one goes to Python. */
        int looks = idle_peek(pool, conn, idle_for);
        if (looks < 0) {
            goto fail;
        }
        if (!looks) {
            goto slow;
        }
    }
    /* Still the last one (nothing above ran Python code: a belt to those braces). */
    if (PyList_GET_SIZE(idle) != n || PyList_GET_ITEM(idle, n - 1) != conn) {
        goto slow;
    }
    if (PyList_SetSlice(idle, n - 1, n, NULL) < 0) {
        goto fail;
    }
    Py_DECREF(idle);
    if (PyObject_SetAttr(conn, s_pooled, Py_False) < 0) {
        Py_DECREF(conn);  /* out of the idle list: its slot is freed when it is collected */
        return NULL;
    }
    return conn;
slow:
    Py_DECREF(idle);
    Py_XDECREF(conn);
    Py_RETURN_NONE;
fail:
    Py_DECREF(idle);
    Py_XDECREF(conn);
    return NULL;
}

static PyObject *
pool_take(PyObject *Py_UNUSED(self), PyObject *pool)
{
    return take_conn(pool);
}

/* pool.attr + conn.attr into *sum (a new reference), or NULL in *sum when conn.attr is 0. */
static int
folded(PyObject *pool, PyObject *conn, PyObject *name, PyObject **sum)
{
    PyObject *mine, *total;
    int nonzero;
    *sum = NULL;
    mine = PyObject_GetAttr(conn, name);
    if (mine == NULL) {
        return -1;
    }
    nonzero = PyObject_IsTrue(mine);
    if (nonzero <= 0) {
        Py_DECREF(mine);
        return nonzero;
    }
    total = PyObject_GetAttr(pool, name);
    if (total == NULL) {
        Py_DECREF(mine);
        return -1;
    }
    *sum = PyNumber_Add(total, mine);
    Py_DECREF(total);
    Py_DECREF(mine);
    return *sum == NULL ? -1 : 0;
}

PyDoc_STRVAR(pool_give_doc,
"pool_give(pool, connection) -> bool\n\n"
"HostPool.release's common path: back on the idle list, its hits and\n"
"misses added to the pool's. False (nothing done) when release() must run.");

/* 1: given back; 0: nothing done, release() must run; -1: an error (the
 * connection may be on the idle list all the same, as after release()). */
static int
give_conn(PyObject *pool, PyObject *conn)
{
    PyObject *mine = NULL, *theirs = NULL, *waiters = NULL, *idle = NULL;
    PyObject *hits = NULL, *misses = NULL, *since = NULL, *zero = NULL;
    int quiet, same, ok = 0;
    if ((PyObject *)Py_TYPE(pool) != pool_type || (PyObject *)Py_TYPE(conn) != conn_type) {
        return 0;
    }
    quiet = pool_quiet(pool);
    if (quiet <= 0) {
        return quiet;
    }
    /* Opened before a fork, or callers waiting: release() hands it on. */
    if ((mine = PyObject_GetAttr(conn, s_pid)) == NULL || (theirs = PyObject_GetAttr(pool, s_pool_pid)) == NULL
        || (same = PyObject_RichCompareBool(mine, theirs, Py_EQ)) < 0
        || (waiters = PyObject_GetAttr(pool, s_waiters)) == NULL
        || (idle = PyObject_GetAttr(pool, s_idle)) == NULL) {
        goto done;
    }
    if (!same || !PyList_CheckExact(waiters) || PyList_GET_SIZE(waiters) != 0 || !PyList_CheckExact(idle)) {
        ok = 1;
        goto done;
    }
    /* What can fail first; then the changes, none of which allocates a container. */
    if (folded(pool, conn, s_hits, &hits) < 0 || folded(pool, conn, s_misses, &misses) < 0
        || (since = PyFloat_FromDouble(now())) == NULL || (zero = PyLong_FromLong(0)) == NULL
        || PyList_Append(idle, conn) < 0) {
        goto done;
    }
    if (PyObject_SetAttr(conn, s_reused, Py_True) < 0 || PyObject_SetAttr(conn, s_idle_since, since) < 0
        || PyObject_SetAttr(conn, s_pooled, Py_True) < 0
        || (hits != NULL && (PyObject_SetAttr(pool, s_hits, hits) < 0 || PyObject_SetAttr(conn, s_hits, zero) < 0))
        || (misses != NULL && (PyObject_SetAttr(pool, s_misses, misses) < 0
                               || PyObject_SetAttr(conn, s_misses, zero) < 0))) {
        goto done;  /* on the idle list: given back all the same, as release() would have */
    }
    ok = 2;
done:
    Py_XDECREF(mine);
    Py_XDECREF(theirs);
    Py_XDECREF(waiters);
    Py_XDECREF(idle);
    Py_XDECREF(hits);
    Py_XDECREF(misses);
    Py_XDECREF(since);
    Py_XDECREF(zero);
    return ok - 1;
}

static PyObject *
pool_give(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    int given;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pool_give(pool, connection)");
        return NULL;
    }
    given = give_conn(args[0], args[1]);
    if (given < 0) {
        return NULL;
    }
    return Py_NewRef(given ? Py_True : Py_False);
}

/* -- Decoding a multi-key reply --------------------------------------------
 *
 * serializer.Serializer.loads_many's loop for items of the default format:
 * one C loop calling each item's decoder (pickle.loads, bytes.decode, int),
 * instead of about 25 bytecodes an item under the GIL (issue 11). */

PyDoc_STRVAR(decode_many_doc,
"decode_many(items, decoders, errors, names) -> (values, failed, rest)\n\n"
"For each key: (data, flags) of items whose flags have a decoder in\n"
"decoders: values[names[key] or key] = decoder(data). An exception that\n"
"is one of errors goes to failed as (key, flags, exception); any other is\n"
"raised. rest lists the keys with no decoder (for Serializer.loads).");

static PyObject *
decode_many(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *items, *decoders, *errors, *names, *snapshot = NULL;
    PyObject *values = NULL, *failed = NULL, *rest = NULL;
    Py_ssize_t i, n;
    if (!PyArg_ParseTuple(args, "O!O!OO", &PyDict_Type, &items, &PyDict_Type, &decoders, &errors, &names)) {
        return NULL;
    }
    if (names != Py_None && !PyDict_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "names must be a dict or None");
        return NULL;
    }
    /* A snapshot: a decoder runs Python code (unpickling), the dict is not walked meanwhile. */
    if ((snapshot = PyDict_Items(items)) == NULL || (values = PyDict_New()) == NULL
        || (failed = PyList_New(0)) == NULL || (rest = PyList_New(0)) == NULL) {
        goto fail;
    }
    n = PyList_GET_SIZE(snapshot);
    for (i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(snapshot, i);
        PyObject *key = PyTuple_GET_ITEM(pair, 0), *item = PyTuple_GET_ITEM(pair, 1);
        PyObject *decoder, *value, *name;
        int stored;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "items must map keys to (data, flags)");
            goto fail;
        }
        decoder = PyDict_GetItemWithError(decoders, PyTuple_GET_ITEM(item, 1));
        if (decoder == NULL) {
            if (PyErr_Occurred() || PyList_Append(rest, key) < 0) {
                goto fail;
            }
            continue;
        }
        Py_INCREF(decoder);
        value = PyObject_CallOneArg(decoder, PyTuple_GET_ITEM(item, 0));
        Py_DECREF(decoder);
        if (value == NULL) {
            PyObject *exc, *entry;
            if (!PyErr_ExceptionMatches(errors)) {
                goto fail;
            }
#if PY_VERSION_HEX >= 0x030C0000
            exc = PyErr_GetRaisedException();
#else
            {
                PyObject *type, *tb;
                PyErr_Fetch(&type, &exc, &tb);
                PyErr_NormalizeException(&type, &exc, &tb);
                if (tb != NULL && exc != NULL) {
                    PyException_SetTraceback(exc, tb);
                }
                Py_XDECREF(type);
                Py_XDECREF(tb);
            }
#endif
            if (exc == NULL) {
                goto fail;
            }
            entry = PyTuple_Pack(3, key, PyTuple_GET_ITEM(item, 1), exc);
            Py_DECREF(exc);
            if (entry == NULL || PyList_Append(failed, entry) < 0) {
                Py_XDECREF(entry);
                goto fail;
            }
            Py_DECREF(entry);
            continue;
        }
        name = key;
        if (names != Py_None) {
            name = PyDict_GetItemWithError(names, key);
            if (name == NULL) {
                if (!PyErr_Occurred()) {
                    PyErr_SetObject(PyExc_KeyError, key);
                }
                Py_DECREF(value);
                goto fail;
            }
        }
        Py_INCREF(name);  /* held: hashing it may run Python code */
        stored = PyDict_SetItem(values, name, value);
        Py_DECREF(name);
        Py_DECREF(value);
        if (stored < 0) {
            goto fail;
        }
    }
    Py_DECREF(snapshot);
    return Py_BuildValue("(NNN)", values, failed, rest);
fail:
    Py_XDECREF(snapshot);
    Py_XDECREF(values);
    Py_XDECREF(failed);
    Py_XDECREF(rest);
    return NULL;
}

/* -- Making a batch's keys -------------------------------------------------
 *
 * backend._made_keys with Django's default key function: "%s%s" % (head,
 * key) for each key, as {made key: key}; one C loop instead of about 16
 * bytecodes a key (issue 11). A key that is not exactly a str (an int, a
 * str Enum with its own __str__) is formatted with str(), as %s does. */

PyDoc_STRVAR(prefixed_doc,
"prefixed(head, keys) -> {'%s%s' % (head, key): key for key in keys}");

static PyObject *
prefixed(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *head, *keys, *seq, *made = NULL;
    Py_ssize_t i, n;
    if (!PyArg_ParseTuple(args, "UO", &head, &keys)) {
        return NULL;
    }
    /* A tuple of its own: str() runs Python code, which (or another thread
     * meanwhile) could change a caller's list under a borrowed item. */
    seq = PySequence_Tuple(keys);
    if (seq == NULL) {
        return NULL;
    }
    n = PyTuple_GET_SIZE(seq);
    if ((made = PyDict_New()) == NULL) {
        goto fail;
    }
    for (i = 0; i < n; i++) {
        PyObject *key = PyTuple_GET_ITEM(seq, i), *text, *full;
        int stored;
        if ((text = PyObject_Str(key)) == NULL) {
            goto fail;
        }
        full = PyUnicode_Concat(head, text);
        Py_DECREF(text);
        if (full == NULL) {
            goto fail;
        }
        stored = PyDict_SetItem(made, full, key);
        Py_DECREF(full);
        if (stored < 0) {
            goto fail;
        }
    }
    Py_DECREF(seq);
    return made;
fail:
    Py_DECREF(seq);
    Py_XDECREF(made);
    return NULL;
}

/* -- One get, whole -------------------------------------------------------
 *
 * Connection.get's round trip on a connection that runs through this
 * module: the command built from the connection's prefix and the key, the
 * deadline from its TIMEOUT, the exchange, the check of the key replied
 * and the hit or miss counted, in one call (Connection.get, _exchange and
 * deadline were about 75 bytecodes a get under the GIL; issue 11). */


/* conn.name += count */
static int
add_count(PyObject *conn, PyObject *name, PyObject *count)
{
    PyObject *before = PyObject_GetAttr(conn, name), *after;
    int done;
    if (before == NULL) {
        return -1;
    }
    after = PyNumber_Add(before, count);
    Py_DECREF(before);
    if (after == NULL) {
        return -1;
    }
    done = PyObject_SetAttr(conn, name, after);
    Py_DECREF(after);
    return done;
}

PyDoc_STRVAR(get_doc,
"get(connection, key, max_line, min_blocking) -> None, (data, flags) or a failure\n\n"
"Connection.get's round trip: None for a miss, (data, flags) for a hit\n"
"(the connection's hits or misses counted), or a (kind, errno, detail)\n"
"failure, as exchange returns it.");

static PyObject *
get_round_trip(PyObject *conn_obj, PyObject *key, Py_ssize_t max_line, double min_blocking)
{
    PyObject *prefix = NULL, *command = NULL;
    PyObject *found = NULL, *result = NULL;
    Py_ssize_t max_value, key_len, prefix_len;
    const char *key_utf8;
    char *out;
    double timeout, deadline;
    int fd, blocks;
    conn_t conn;
    if ((key_utf8 = PyUnicode_AsUTF8AndSize(key, &key_len)) == NULL
        || conn_io(conn_obj, &fd, &prefix, &blocks) < 0
        || conn_limits(conn_obj, max_line, &max_value, &timeout) < 0) {
        goto done;
    }
    prefix_len = PyBytes_GET_SIZE(prefix);
    deadline = timeout < 0 ? -1.0 : now() + timeout;  /* Connection.deadline */
    if ((command = PyBytes_FromStringAndSize(NULL, 4 + prefix_len + key_len + 2)) == NULL) {
        goto done;
    }
    out = PyBytes_AS_STRING(command);
    memcpy(out, "get ", 4);
    memcpy(out + 4, PyBytes_AS_STRING(prefix), (size_t)prefix_len);
    memcpy(out + 4 + prefix_len, key_utf8, (size_t)key_len);
    memcpy(out + 4 + prefix_len + key_len, "\r\n", 2);
    if (init_conn(&conn, fd, command, MODE_GET, 1, blocks) < 0) {
        free_conns(&conn, 1);
        goto done;
    }
    /* `command` is ours until the end: its bytes are sent without the GIL. */
    if (run(&conn, 1, deadline, timeout, max_value, max_line, min_blocking) == 0) {
        found = outcome(&conn, NULL);
    }
    free_conns(&conn, 1);
    if (found == NULL) {
        goto done;
    }
    if (!PyList_Check(found)) {
        result = Py_NewRef(found);  /* a failure */
    }
    else if (PyList_GET_SIZE(found) == 0) {
        if (add_count(conn_obj, s_misses, one) == 0) {
            result = Py_NewRef(Py_None);
        }
    }
    else {
        PyObject *item = PyList_GET_ITEM(found, 0);  /* (key, flags, data) */
        PyObject *got = PyTuple_GET_ITEM(item, 0);
        Py_ssize_t wire_len = prefix_len + key_len;
        if (PyList_GET_SIZE(found) != 1 || PyBytes_GET_SIZE(got) != wire_len
            || memcmp(PyBytes_AS_STRING(got), out + 4, (size_t)wire_len) != 0) {
            /* init_keys already refuses any other key: a belt to those braces. */
            result = Py_BuildValue("(iis)", F_PROTOCOL, 0, "reply for a key not asked for");
        }
        else if (add_count(conn_obj, s_hits, one) == 0) {
            result = PyTuple_Pack(2, PyTuple_GET_ITEM(item, 2), PyTuple_GET_ITEM(item, 1));
        }
    }
done:
    Py_XDECREF(prefix);
    Py_XDECREF(command);
    Py_XDECREF(found);
    return result;
}

static PyObject *
get_one(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *conn_obj, *key;
    Py_ssize_t max_line;
    double min_blocking;
    if (!PyArg_ParseTuple(args, "OUnd", &conn_obj, &key, &max_line, &min_blocking)) {
        return NULL;
    }
    return get_round_trip(conn_obj, key, max_line, min_blocking);
}

/* -- A pipelined get_many from the pools, in one call ----------------------
 *
 * Client.get_many's common path (issue 11, seventh round): what _pipeline
 * does for a get over several servers when every server's pool has an idle
 * connection to give (pool_take) and each runs through this module. In
 * Python that was about 250 bytecodes a server, under the GIL. Anything
 * else returns None with nothing taken and the caller runs _pipeline. */

/* The pool of server `index` (borrowed), or NULL with an exception. Only
 * from a tuple, which no thread can change while the GIL is released: the
 * pool is borrowed from it until the end of the call. */
static PyObject *
pool_at(PyObject *pools, PyObject *index)
{
    Py_ssize_t at;
    if (!PyTuple_Check(pools)) {
        PyErr_SetString(PyExc_TypeError, "pools must be a tuple");
        return NULL;
    }
    at = PyLong_Check(index) ? PyLong_AsSsize_t(index) : -1;
    if (at < 0 || at >= PyTuple_GET_SIZE(pools)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_IndexError, "an index that is not a server's");
        }
        return NULL;
    }
    return PyTuple_GET_ITEM(pools, at);
}

/* pool.discard(conn): 0, or -1 with its exception. */
static int
discard_one(PyObject *pool, PyObject *conn)
{
    PyObject *done = PyObject_CallMethodOneArg(pool, s_discard, conn);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

typedef struct {
    PyObject *pool, *conn, *index, *keys;  /* the pool borrowed (pools holds it) */
    int held;  /* checked out by this call: discarded on the way out */
} taken_t;

/* Discard every connection still held (pool.discard), keeping the error
 * being raised: a connection that saw any exception is never reused. */
static void
discard_held(taken_t *taken, Py_ssize_t n)
{
    Py_ssize_t i;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
#endif
    for (i = 0; i < n; i++) {
        if (taken[i].held) {
            taken[i].held = 0;
            if (discard_one(taken[i].pool, taken[i].conn) < 0) {
                PyErr_WriteUnraisable(taken[i].pool);
            }
        }
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(type, value, tb);
#endif
}

/* Give back a connection that answered: pool_give, or release() when the
 * pool's state asks for the Python path. */
static int
give_or_release(PyObject *pool, PyObject *conn)
{
    PyObject *done;
    int given = give_conn(pool, conn);
    if (given != 0) {
        return given < 0 ? -1 : 0;
    }
    done = PyObject_CallMethodOneArg(pool, s_release, conn);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

PyDoc_STRVAR(get_pooled_doc,
"get_pooled(pools, groups, max_line, min_blocking, into) -> failures or None\n\n"
"Client.get_many's common path. groups maps a server's index in pools to\n"
"its keys (str). Takes an idle connection from each pool as pool_take does;\n"
"None, with nothing taken, when a pool has none to give this way or one\n"
"does not run through this module (the caller runs the Python path).\n"
"Else sends every server its get and reads every reply in one release of\n"
"the GIL, within one TIMEOUT (the connections'), puts key: (data, flags)\n"
"in into, counts hits and misses, and gives back each connection that\n"
"answered. Returns [(index, connection, keys, failure)] of the servers that\n"
"failed, their connections already discarded (closed, slots freed).\n"
"Whatever it raises, every connection it took and did not give back is\n"
"discarded.");

static PyObject *
get_pooled(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *pools, *groups, *into, *index, *keys, *attr = NULL;
    PyObject *result = NULL, *failures = NULL;
    Py_ssize_t max_line, max_value = 0, n, i = 0, pos = 0;
    double min_blocking, timeout = -1.0, deadline = -1.0;
    taken_t *taken;
    conn_t *conns;
    if (!PyArg_ParseTuple(args, "OO!ndO!", &pools, &PyDict_Type, &groups,
                          &max_line, &min_blocking, &PyDict_Type, &into)) {
        return NULL;
    }
    n = PyDict_GET_SIZE(groups);
    if (n == 0) {
        return PyList_New(0);
    }
    taken = PyMem_Calloc((size_t)n, sizeof(taken_t));
    conns = PyMem_Calloc((size_t)n, sizeof(conn_t));
    if (taken == NULL || conns == NULL) {
        PyMem_Free(taken);
        PyMem_Free(conns);
        return PyErr_NoMemory();
    }
    /* Take: no Python code runs (see pool_take), so no other thread either,
     * and a connection taken can be put back as it was. */
    while (PyDict_Next(groups, &pos, &index, &keys)) {
        PyObject *pool = pool_at(pools, index), *conn;
        int native;
        if (pool == NULL || (conn = take_conn(pool)) == NULL) {
            goto fail;
        }
        if (conn == Py_None) {
            Py_DECREF(conn);
            goto fallback;
        }
        taken[i] = (taken_t){pool, conn, Py_NewRef(index), Py_NewRef(keys), 1};
        i++;
        if ((attr = PyObject_GetAttr(conn, s_native)) == NULL || (native = PyObject_IsTrue(attr)) < 0) {
            goto fail;
        }
        Py_CLEAR(attr);
        if (!native) {
            goto fallback;
        }
    }
    /* The requests, as Connection.get_many_request gives them. */
    if (conn_limits(taken[0].conn, max_line, &max_value, &timeout) < 0) {
        goto fail;
    }
    for (i = 0; i < n; i++) {
        PyObject *prefix;
        int fd, blocks, made;
        if (conn_io(taken[i].conn, &fd, &prefix, &blocks) < 0) {
            goto fail;
        }
        made = init_get_keys(&conns[i], fd, prefix, taken[i].keys, blocks);
        Py_DECREF(prefix);
        if (made < 0) {
            goto fail;
        }
    }
    /* TIMEOUT runs from when every connection is in hand (as in _pipeline). */
    if (timeout >= 0) {
        deadline = now() + timeout;
    }
    /* Each conns[i] holds its command; groups holds the keys. */
    if (run(conns, n, deadline, timeout, max_value, max_line, min_blocking) < 0
        || (failures = PyList_New(0)) == NULL) {
        goto fail;
    }
    for (i = 0; i < n; i++) {
        PyObject *one = outcome(&conns[i], into);
        if (one == NULL) {
            goto fail;
        }
        if (PyTuple_GET_SIZE(one) == 2) {
            int counted = add_count(taken[i].conn, s_hits, PyTuple_GET_ITEM(one, 0)) == 0
                          && add_count(taken[i].conn, s_misses, PyTuple_GET_ITEM(one, 1)) == 0;
            Py_DECREF(one);
            if (!counted) {
                goto fail;
            }
            /* Off the held list first: once given back it may be another
             * caller's, even if giving it back fails part-way. */
            taken[i].held = 0;
            if (give_or_release(taken[i].pool, taken[i].conn) < 0) {
                goto fail;
            }
            continue;
        }
        /* Closed and its slot freed here, before Python sees it: nothing
         * raised between here and the caller's handling can keep it. */
        if (discard_one(taken[i].pool, taken[i].conn) < 0) {
            Py_DECREF(one);
            goto fail;
        }
        taken[i].held = 0;
        attr = PyTuple_Pack(4, taken[i].index, taken[i].conn, taken[i].keys, one);
        Py_DECREF(one);
        if (attr == NULL || PyList_Append(failures, attr) < 0) {
            goto fail;
        }
        Py_CLEAR(attr);
    }
    result = failures;
    failures = NULL;
    goto done;
fallback:
    /* Nothing sent: each connection goes back as it was taken. */
    while (i > 0) {
        i--;
        taken[i].held = 0;
        if (give_or_release(taken[i].pool, taken[i].conn) < 0) {
            goto fail;
        }
    }
    result = Py_NewRef(Py_None);
    goto done;
fail:
    discard_held(taken, n);
done:
    for (i = 0; i < n; i++) {
        Py_XDECREF(taken[i].conn);
        Py_XDECREF(taken[i].index);
        Py_XDECREF(taken[i].keys);
    }
    Py_XDECREF(attr);
    Py_XDECREF(failures);
    free_conns(conns, n);
    PyMem_Free(conns);
    PyMem_Free(taken);
    return result;
}

/* A one-key command's common path: the key's server among scored (as
 * choose, no hashing for one server) and an idle connection from its pool
 * that runs Connection's own C path (as pool_take). 1: taken (*conn a new
 * reference, *pool borrowed); 0: *index (a new reference) is the server
 * whose pool must run the Python path, nothing taken; -1: an error. */
static int
take_placed(PyObject *pools, PyObject *scored, PyObject *key, PyObject **index, PyObject **pool,
            PyObject **conn)
{
    PyObject *attr;
    int native;
    unsigned char stack[PLACE_STACK];
    *index = *conn = NULL;
    if ((scored = scored_arg(scored)) == NULL) {
        return -1;
    }
    *index = PyTuple_GET_SIZE(scored) == 1 ? PyTuple_GET_ITEM(PyTuple_GET_ITEM(scored, 0), 1)
                                           : place_one(key, scored, stack);
    Py_XINCREF(*index);
    Py_DECREF(scored);
    if (*index == NULL) {
        return -1;
    }
    if ((*pool = pool_at(pools, *index)) == NULL || (*conn = take_conn(*pool)) == NULL) {
        Py_CLEAR(*index);
        return -1;
    }
    if (*conn == Py_None) {
        Py_CLEAR(*conn);
        return 0;
    }
    /* Connection's C paths: exactly Connection (take_conn checks), through this module. */
    if ((attr = PyObject_GetAttr(*conn, s_native_get)) == NULL || (native = PyObject_IsTrue(attr)) < 0) {
        taken_t held = {*pool, *conn, NULL, NULL, 1};
        Py_XDECREF(attr);
        discard_held(&held, 1);
        Py_CLEAR(*conn);
        Py_CLEAR(*index);
        return -1;
    }
    Py_DECREF(attr);
    if (!native) {
        /* Nothing sent: back as it was taken, and the Python path runs. */
        int back = give_or_release(*pool, *conn);
        Py_CLEAR(*conn);
        if (back < 0) {
            Py_CLEAR(*index);
            return -1;
        }
        return 0;
    }
    return 1;
}

/* After a one-key command's round trip on a connection take_placed gave:
 * `outcome` (a new reference, or NULL when an exception is being raised),
 * and `failed`, true when the server failed. Gives the connection back and
 * returns the outcome; or discards it (pool.discard) and returns [index,
 * connection, outcome] for the caller to settle; or discards it and
 * returns NULL. Steals every reference. */
static PyObject *
placed_done(PyObject *index, PyObject *pool, PyObject *conn, PyObject *outcome, int failed)
{
    if (outcome != NULL && failed) {
        /* Closed and its slot freed before Python sees it (as get_pooled). */
        PyObject *list = discard_one(pool, conn) < 0 ? NULL : PyList_New(3);
        if (list != NULL) {
            PyList_SET_ITEM(list, 0, index);
            PyList_SET_ITEM(list, 1, conn);
            PyList_SET_ITEM(list, 2, outcome);
            return list;
        }
        Py_CLEAR(outcome);
    }
    if (outcome == NULL) {
        taken_t held = {pool, conn, NULL, NULL, 1};
        discard_held(&held, 1);
    }
    else if (give_or_release(pool, conn) < 0) {
        Py_CLEAR(outcome);
    }
    Py_DECREF(index);
    Py_DECREF(conn);
    return outcome;
}

PyDoc_STRVAR(get_placed_doc,
"get_placed(pools, scored, key, max_line, min_blocking) -> outcome\n\n"
"Client.get's common path in one call: the key's server among scored (as\n"
"choose), an idle connection from its pool (as pool_take), the round trip\n"
"(as get) and the connection given back. None for a miss, (data, flags)\n"
"for a hit; the server's index (an int), with nothing taken, when its pool\n"
"has no connection to give this way (the caller runs the Python path\n"
"there); [index, connection, failure] when the server failed (the\n"
"connection already discarded: closed, its slot freed). Whatever it\n"
"raises, the connection it took is discarded.");

static PyObject *
get_placed(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *pools, *scored, *key, *index, *pool, *conn, *result;
    Py_ssize_t max_line;
    double min_blocking;
    int taken;
    if (!PyArg_ParseTuple(args, "OOUnd", &pools, &scored, &key, &max_line, &min_blocking)) {
        return NULL;
    }
    taken = take_placed(pools, scored, key, &index, &pool, &conn);
    if (taken <= 0) {
        return taken < 0 ? NULL : index;
    }
    result = get_round_trip(conn, key, max_line, min_blocking);
    /* None: a miss; (data, flags): a hit; (kind, errno, detail): a failure. */
    return placed_done(index, pool, conn, result,
                       result != NULL && result != Py_None && PyTuple_GET_SIZE(result) != 2);
}

/* A storage command's reply line that is an outcome for the item, the
 * connection still in step (connection._store_outcome's lines). */
static int
store_outcome_line(const char *line, Py_ssize_t len)
{
#define IS(word) (len == (Py_ssize_t)sizeof(word) - 1 && memcmp(line, word, sizeof(word) - 1) == 0)
    return IS("STORED") || IS("NOT_STORED") || IS("EXISTS") || IS("NOT_FOUND")
           || (len >= 12 && memcmp(line, "SERVER_ERROR", 12) == 0);
#undef IS
}

/* The storage commands store_placed sends (cas has a field more). */
static int
storage_word(PyObject *command)
{
    static const char *words[] = {"set", "add", "replace", "append", "prepend"};
    size_t i;
    for (i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        if ((size_t)PyBytes_GET_SIZE(command) == strlen(words[i])
            && memcmp(PyBytes_AS_STRING(command), words[i], strlen(words[i])) == 0) {
            return 1;
        }
    }
    return 0;
}

PyDoc_STRVAR(store_placed_doc,
"store_placed(pools, scored, command, key, data, flags, expire, max_line, min_blocking) -> outcome\n\n"
"Client._store's common path in one call, as get_placed: \"<command>\n"
"<prefix><key> <flags> <expire> <len>\\r\\n<data>\\r\\n\" and its one reply\n"
"line. None when stored; the reply line (bytes) when the item was not\n"
"(NOT_STORED, EXISTS, NOT_FOUND, SERVER_ERROR ...: the connection is given\n"
"back); the server's index when the Python path must run; [index,\n"
"connection, failure] when the server failed (the connection already\n"
"discarded), the failure being a (kind, errno, detail) tuple or any\n"
"other reply line (bytes). Refuses any other command word, and flags or\n"
"an expiry memcached would misread, before taking a connection.");

static PyObject *
store_placed(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *pools, *scored, *command, *key, *data, *index, *pool, *conn, *prefix = NULL;
    PyObject *request = NULL, *result = NULL;
    PyObject *flags_o;
    unsigned long long flags;
    long long expire;
    Py_ssize_t max_line, max_value, key_len, head_len, size;
    double min_blocking, timeout, deadline;
    const char *key_utf8;
    char head[96], *out;
    int taken, fd, blocks, failed = 1;
    conn_t c;
    if (!PyArg_ParseTuple(args, "OOSUSO!Lnd", &pools, &scored, &command, &key, &data, &PyLong_Type, &flags_o,
                          &expire, &max_line, &min_blocking)) {
        return NULL;
    }
    flags = PyLong_AsUnsignedLongLong(flags_o);  /* OverflowError below 0 or past 64 bits */
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (!storage_word(command) || flags > 0xFFFFFFFFULL || expire < INT32_MIN || expire > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a storage command, or flags or expire out of range");
        return NULL;
    }
    if ((key_utf8 = PyUnicode_AsUTF8AndSize(key, &key_len)) == NULL) {
        return NULL;
    }
    taken = take_placed(pools, scored, key, &index, &pool, &conn);
    if (taken <= 0) {
        return taken < 0 ? NULL : index;
    }
    memset(&c, 0, sizeof(c));
    if (conn_io(conn, &fd, &prefix, &blocks) < 0 || conn_limits(conn, max_line, &max_value, &timeout) < 0) {
        goto done;
    }
    head_len = snprintf(head, sizeof(head), " %llu %lld %zd\r\n", flags, expire, PyBytes_GET_SIZE(data));
    size = PyBytes_GET_SIZE(command) + 1 + PyBytes_GET_SIZE(prefix) + key_len + head_len
           + PyBytes_GET_SIZE(data) + 2;
    if ((request = PyBytes_FromStringAndSize(NULL, size)) == NULL) {
        goto done;
    }
    out = PyBytes_AS_STRING(request);
    memcpy(out, PyBytes_AS_STRING(command), (size_t)PyBytes_GET_SIZE(command));
    out += PyBytes_GET_SIZE(command);
    *out++ = ' ';
    memcpy(out, PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix));
    out += PyBytes_GET_SIZE(prefix);
    memcpy(out, key_utf8, (size_t)key_len);
    out += key_len;
    memcpy(out, head, (size_t)head_len);
    out += head_len;
    memcpy(out, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));
    out += PyBytes_GET_SIZE(data);
    memcpy(out, "\r\n", 2);
    deadline = timeout < 0 ? -1.0 : now() + timeout;  /* Connection.deadline */
    if (init_conn(&c, fd, request, MODE_LINES, 1, blocks) < 0) {
        goto done;
    }
    /* `request` is ours until the end: its bytes are sent without the GIL. */
    if (run(&c, 1, deadline, timeout, max_value, max_line, min_blocking) < 0
        || (result = outcome(&c, NULL)) == NULL) {
        goto done;
    }
    if (PyList_Check(result)) {
        PyObject *line = Py_NewRef(PyList_GET_ITEM(result, 0));
        Py_SETREF(result, line);
        failed = !store_outcome_line(PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line));
        if (!failed && PyBytes_GET_SIZE(line) == 6 && memcmp(PyBytes_AS_STRING(line), "STORED", 6) == 0) {
            Py_SETREF(result, Py_NewRef(Py_None));
        }
    }
done:
    free_conns(&c, 1);
    Py_XDECREF(prefix);
    Py_XDECREF(request);
    return placed_done(index, pool, conn, result, failed);
}

static PyMethodDef methods[] = {
    {"stale", stale, METH_O, stale_doc},
    {"exchange", exchange, METH_VARARGS, exchange_doc},
    {"exchange_many", exchange_many, METH_VARARGS, exchange_many_doc},
    {"choose", choose, METH_VARARGS, choose_doc},
    {"group", group, METH_VARARGS, group_doc},
    {"get", get_one, METH_VARARGS, get_doc},
    {"get_pooled", get_pooled, METH_VARARGS, get_pooled_doc},
    {"get_placed", get_placed, METH_VARARGS, get_placed_doc},
    {"store_placed", store_placed, METH_VARARGS, store_placed_doc},
    {"pool_types", pool_types, METH_VARARGS, pool_types_doc},
    {"monotonic", monotonic, METH_NOARGS, monotonic_doc},
    {"pool_take", pool_take, METH_O, pool_take_doc},
    {"decode_many", decode_many, METH_VARARGS, decode_many_doc},
    {"prefixed", prefixed, METH_VARARGS, prefixed_doc},
    {"pool_give", (PyCFunction)(void (*)(void))pool_give, METH_FASTCALL, pool_give_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "djmemcache._speedups",
    "Round trips to memcached with the GIL released (optional; see connection.py).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m;
    struct { PyObject **slot; const char *name; } names[] = {
        {&s_lock, "_lock"}, {&s_locked, "locked"}, {&s_idle, "_idle"}, {&s_waiters, "_waiters"},
        {&s_check_after, "_check_after"}, {&s_pid, "pid"}, {&s_pool_pid, "_pid"}, {&s_sock, "sock"},
        {&s_idle_since, "idle_since"}, {&s_pooled, "pooled"}, {&s_reused, "reused"},
        {&s_hits, "hits"}, {&s_misses, "misses"}, {&s_key_prefix, "key_prefix"}, {&s_fd, "_fd"},
        {&s_timeout, "timeout"}, {&s_max_value_size, "max_value_size"},
        {&s_first_read_blocks, "_first_read_blocks"}, {&s_native, "_native"}, {&s_discard, "discard"},
        {&s_release, "release"}, {&s_idle_timeout, "idle_timeout"},
        {&s_native_get, "_native_get"},
    };
    size_t i;
    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL) {
            return NULL;
        }
    }
    if (one == NULL && (one = PyLong_FromLong(1)) == NULL) {
        return NULL;
    }
    m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "API", API) < 0
        || PyModule_AddIntConstant(m, "MODE_GET", MODE_GET) < 0
        || PyModule_AddIntConstant(m, "MODE_LINES", MODE_LINES) < 0
        || PyModule_AddIntConstant(m, "F_ERRNO", F_ERRNO) < 0
        || PyModule_AddIntConstant(m, "F_CLOSED", F_CLOSED) < 0
        || PyModule_AddIntConstant(m, "F_TIMEOUT", F_TIMEOUT) < 0
        || PyModule_AddIntConstant(m, "F_LATE", F_LATE) < 0
        || PyModule_AddIntConstant(m, "F_PROTOCOL", F_PROTOCOL) < 0
        || PyModule_AddIntConstant(m, "F_ERROR_LINE", F_ERROR_LINE) < 0
        || PyModule_AddIntConstant(m, "F_NOMEM", F_NOMEM) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
