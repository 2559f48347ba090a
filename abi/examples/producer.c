/*
 * A telemetry producer in C, written from abi/README.md alone: it asks metricsd for
 * two rings over the control socket, maps them, registers its series, span name,
 * attribute key and string value, records counters, a gauge, a histogram and spans,
 * and prints what it recorded so that a test can compare metricsd's totals with it.
 *
 *   cc -std=c11 -O2 -Wall -Wextra -o producer abi/examples/producer.c
 *   NEXUS_METRICSD_SOCKET=/run/metricsd.sock ./producer [SAMPLES]
 *
 * Ring A: for i in 0..SAMPLES, counter c.requests{route="/x",lang="c"} += i % 5 + 1,
 * gauge c.queue_depth = i - SAMPLES / 2, histogram c.latency_ns observes 7 * i.
 * Ring B: SAMPLES / 10 spans named c.op (every third ends with status error), each
 * with the attributes c.rows = its index and c.lang = "C" (a registered string), and
 * c.requests{route="/x",lang="c"} += 1 per span (registered again: keys are per ring).
 *
 * It waits for room when a ring is full, so its totals are exact; a producer on a hot
 * path would instead drop the record and count it in `dropped` (section 3).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Section 1: the grant. */
struct grant_request {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    uint32_t capacity;
    uint32_t flags;
    uint64_t hint;
    uint64_t reserved;
};
struct grant_response {
    uint32_t magic;
    uint16_t version;
    uint16_t status;
    uint32_t ring_id;
    uint32_t capacity;
    uint64_t epoch;
    uint64_t reserved;
};
_Static_assert(sizeof(struct grant_request) == 32, "GrantRequest is 32 bytes");
_Static_assert(sizeof(struct grant_response) == 32, "GrantResponse is 32 bytes");
#define GRANT_MAGIC 0x5247584eu /* "NXGR" */

/* Section 2: the region. */
#define RING_MAGIC 0x31474e495254584eull /* "NXTRING1" */
#define OFF_ABI_MAJOR 8
#define OFF_HEADER_SIZE 12
#define OFF_RECORD_SIZE 16
#define OFF_CAPACITY 20
#define OFF_WRITE_POS 128
#define OFF_READ_POS 256
#define OFF_CONSUMER_FLAGS 264

/* Section 3: records. */
struct record {
    uint16_t kind;
    uint16_t flags;
    uint32_t key;
    uint64_t words[3];
};
_Static_assert(sizeof(struct record) == 32, "records are 32 bytes");
enum {
    KIND_COUNTER = 0x01,
    KIND_GAUGE = 0x02,
    KIND_HISTOGRAM = 0x03,
    KIND_SPAN_START = 0x10,
    KIND_SPAN_END = 0x11,
    KIND_SPAN_ATTR = 0x12,
    KIND_REGISTER = 0x20,
    KIND_REGISTER_DATA = 0x21,
};
enum { WHAT_COUNTER = 1, WHAT_GAUGE = 2, WHAT_HISTOGRAM = 3, WHAT_SPAN = 4, WHAT_ATTR = 5, WHAT_STRING = 6 };
enum { STATUS_OK = 1, STATUS_ERROR = 2 };
enum { VALUE_U64 = 0, VALUE_STRING = 2 };

/* One granted ring, as the producer keeps it. */
struct ring {
    unsigned char *base;
    uint64_t capacity;
    uint32_t header_size;
    uint64_t write;       /* next position to write; published up to here by flush */
    uint64_t cached_read; /* the consumer's read position, as last loaded */
    uint64_t *write_pos;
    uint64_t *read_pos;
    uint64_t *consumer_flags;
};

static void die(const char *what) {
    fprintf(stderr, "c-producer: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) die("clock_gettime");
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint16_t load16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t load32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t load64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int control_connect(void) {
    const char *path = getenv("NEXUS_METRICSD_SOCKET");
    char fallback[sizeof(((struct sockaddr_un *)0)->sun_path)];
    if (!path) {
        const char *dir = getenv("XDG_RUNTIME_DIR");
        if (dir) {
            snprintf(fallback, sizeof fallback, "%s/metricsd.sock", dir);
            path = fallback;
        } else {
            path = "/run/metricsd.sock";
        }
    }
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) die("socket path too long");
    strcpy(addr.sun_path, path);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) die("connect");
    return fd;
}

/* Asks for a ring of `capacity` records and maps it. */
static void grant(int control, uint32_t capacity, struct ring *r) {
    struct grant_request req = {
        .magic = GRANT_MAGIC, .version = 1, .op = 1, .capacity = capacity, .hint = (uint64_t)getpid(),
    };
    if (send(control, &req, sizeof req, MSG_NOSIGNAL) != (ssize_t)sizeof req) die("send grant request");

    struct grant_response resp;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control_buf;
    struct iovec iov = {.iov_base = &resp, .iov_len = sizeof resp};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control_buf.buf, .msg_controllen = sizeof control_buf.buf,
    };
    ssize_t n = recvmsg(control, &msg, MSG_CMSG_CLOEXEC);
    if (n != (ssize_t)sizeof resp) die("receive grant response");
    if (resp.magic != GRANT_MAGIC || resp.version != 1) die("grant response: bad magic or version");
    if (resp.status != 0) {
        fprintf(stderr, "c-producer: grant refused with status %u\n", resp.status);
        exit(1);
    }
    int fd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(&fd, CMSG_DATA(c), sizeof fd);
    }
    if (fd < 0) die("no fd with the grant");

    /* Refuse a region anyone could resize under us. */
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) die("memfd not sealed");
    struct stat st;
    if (fstat(fd, &st) != 0) die("fstat");
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) die("mmap");
    close(fd);

    unsigned char *b = base;
    r->base = b;
    r->header_size = load32(b + OFF_HEADER_SIZE);
    r->capacity = load32(b + OFF_CAPACITY);
    if (load64(b) != RING_MAGIC || load16(b + OFF_ABI_MAJOR) != 1 || load32(b + OFF_RECORD_SIZE) != 32 ||
        r->capacity != resp.capacity || r->capacity < 2 || (r->capacity & (r->capacity - 1)) != 0 ||
        (uint64_t)r->header_size + r->capacity * 32 > (uint64_t)st.st_size) {
        die("region header does not match the ABI");
    }
    r->write_pos = (uint64_t *)(b + OFF_WRITE_POS);
    r->read_pos = (uint64_t *)(b + OFF_READ_POS);
    r->consumer_flags = (uint64_t *)(b + OFF_CONSUMER_FLAGS);
    /* A fresh ring starts at 0; the producer never writes the consumer line. */
    r->write = __atomic_load_n(r->write_pos, __ATOMIC_RELAXED);
    r->cached_read = __atomic_load_n(r->read_pos, __ATOMIC_ACQUIRE);
}

/* Publishes every record written so far with one release store (section 4). */
static void flush(struct ring *r) { __atomic_store_n(r->write_pos, r->write, __ATOMIC_RELEASE); }

/* Waits until `n` slots are free, reloading the consumer's position only when the
 * cached one says there is no room (section 4), publishing what is staged first. */
static void wait_room(struct ring *r, uint64_t n) {
    while (r->capacity - (r->write - r->cached_read) < n) {
        flush(r);
        r->cached_read = __atomic_load_n(r->read_pos, __ATOMIC_ACQUIRE);
        if (r->capacity - (r->write - r->cached_read) >= n) break;
        if (__atomic_load_n(r->consumer_flags, __ATOMIC_RELAXED) & 3) die("ring quarantined or closed");
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 100000};
        nanosleep(&pause, NULL);
    }
}

/* Writes one record into its slot with plain stores; flush publishes it. */
static void put(struct ring *r, const struct record *rec) {
    wait_room(r, 1);
    struct record *slot = (struct record *)(r->base + r->header_size) + (r->write & (r->capacity - 1));
    memcpy(slot, rec, sizeof *rec);
    r->write += 1;
}

/* Registers `key` (section 3.1): the payload is the name, then per label a length
 * byte, the key, a length byte, the value. Published with the head in one store. */
static void reg(struct ring *r, uint32_t key, uint16_t what, const char *name, int labels, const char *const *kv) {
    unsigned char payload[880];
    size_t len = strlen(name);
    memcpy(payload, name, len);
    for (int i = 0; i < 2 * labels; i++) {
        size_t n = strlen(kv[i]);
        payload[len++] = (unsigned char)n;
        memcpy(payload + len, kv[i], n);
        len += n;
    }
    struct record head = {.kind = KIND_REGISTER, .flags = what, .key = key};
    head.words[0] = (uint64_t)strlen(name) | (uint64_t)labels << 16 | (uint64_t)len << 32;
    /* Room for the whole registration first, so no publish splits it. */
    wait_room(r, 1 + (len + 23) / 24);
    put(r, &head);
    for (size_t at = 0, seq = 0; at < len; at += 24, seq++) {
        struct record data = {.kind = KIND_REGISTER_DATA, .flags = (uint16_t)seq, .key = key};
        memcpy(data.words, payload + at, len - at < 24 ? len - at : 24);
        put(r, &data);
    }
    flush(r);
}

static struct record rec(uint16_t kind, uint16_t flags, uint32_t key, uint64_t a, uint64_t b, uint64_t c) {
    struct record out = {.kind = kind, .flags = flags, .key = key, .words = {a, b, c}};
    return out;
}

int main(int argc, char **argv) {
    uint64_t samples = argc > 1 ? strtoull(argv[1], NULL, 10) : 100000;
    int control = control_connect(); /* kept open for the life of the process */
    struct ring a, b;
    grant(control, 1024, &a);
    grant(control, 256, &b);

    static const char *const labels[] = {"route", "/x", "lang", "c"};
    enum { REQUESTS = 1, DEPTH = 2, LATENCY = 3, OP = 10, ROWS = 11, LANG = 12, LANG_C = 13 };
    reg(&a, REQUESTS, WHAT_COUNTER, "c.requests", 2, labels);
    reg(&a, DEPTH, WHAT_GAUGE, "c.queue_depth", 0, NULL);
    reg(&a, LATENCY, WHAT_HISTOGRAM, "c.latency_ns", 0, NULL);
    reg(&b, REQUESTS, WHAT_COUNTER, "c.requests", 2, labels);
    reg(&b, OP, WHAT_SPAN, "c.op", 0, NULL);
    reg(&b, ROWS, WHAT_ATTR, "c.rows", 0, NULL);
    reg(&b, LANG, WHAT_ATTR, "c.lang", 0, NULL);
    reg(&b, LANG_C, WHAT_STRING, "C", 0, NULL);

    uint64_t requests = 0, latency_sum = 0;
    int64_t depth = 0;
    for (uint64_t i = 0; i < samples; i++) {
        struct record c = rec(KIND_COUNTER, 0, REQUESTS, i % 5 + 1, 0, 0);
        depth = (int64_t)i - (int64_t)(samples / 2);
        struct record g = rec(KIND_GAUGE, 0, DEPTH, (uint64_t)depth, 0, 0);
        struct record h = rec(KIND_HISTOGRAM, 0, LATENCY, 7 * i, 0, 0);
        put(&a, &c);
        put(&a, &g);
        put(&a, &h);
        requests += i % 5 + 1;
        latency_sum += 7 * i;
        if (i % 64 == 63) flush(&a); /* batching: one release store per 64 samples */
    }
    flush(&a);

    uint64_t spans = samples / 10, errors = 0, duration_sum = 0;
    for (uint64_t i = 0; i < spans; i++) {
        uint64_t id = i + 1; /* a per-ring sequence from 1 */
        uint64_t start = now_ns();
        struct record s = rec(KIND_SPAN_START, 0, OP, id, 0, start);
        struct record rows = rec(KIND_SPAN_ATTR, VALUE_U64, ROWS, id, i, 0);
        struct record lang = rec(KIND_SPAN_ATTR, VALUE_STRING, LANG, id, LANG_C, 0);
        struct record c = rec(KIND_COUNTER, 0, REQUESTS, 1, 0, 0);
        put(&b, &s);
        put(&b, &rows);
        put(&b, &lang);
        put(&b, &c);
        uint64_t end = now_ns();
        uint16_t status = i % 3 == 2 ? STATUS_ERROR : STATUS_OK;
        errors += status == STATUS_ERROR;
        struct record e = rec(KIND_SPAN_END, status, OP, id, end, 0);
        put(&b, &e);
        duration_sum += end - start;
        requests += 1;
        flush(&b);
    }

    printf("c-producer: ok requests=%llu depth=%lld latency_count=%llu latency_sum=%llu spans=%llu errors=%llu "
           "duration_sum=%llu\n",
           (unsigned long long)requests, (long long)depth, (unsigned long long)samples,
           (unsigned long long)latency_sum, (unsigned long long)spans, (unsigned long long)errors,
           (unsigned long long)duration_sum);
    fflush(stdout);
    /* Wait until metricsd has read everything, then leave (closing the connection). */
    for (int tries = 0; tries < 20000; tries++) {
        if (__atomic_load_n(a.read_pos, __ATOMIC_ACQUIRE) == a.write &&
            __atomic_load_n(b.read_pos, __ATOMIC_ACQUIRE) == b.write) {
            close(control);
            return 0;
        }
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 1000000};
        nanosleep(&pause, NULL);
    }
    fprintf(stderr, "c-producer: metricsd did not read everything within 20 s\n");
    return 1;
}
