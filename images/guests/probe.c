/*
 * probe.c - memory probe for nested-xen L2 guests.
 *
 * Runs as root inside a guest's initramfs.  It fills N anonymous pages with
 * content derived from a random nonce and the page index, locks them, and
 * reports for each page its guest PFN (from /proc/self/pagemap) and SHA-256,
 * so the harness in dom0 can map those frames and compare.  Every report line
 * is "NXPROBE <json> *<crc32 of json, 8 hex>"; see harness/probe_report.py.
 *
 * Options, from argv or (only when argv does not set them) /proc/cmdline:
 *   nxprobe.pages=N      pages to probe (default 64)
 *   nxprobe.tick_ms=T    print "NXTICK seq mono_ns real_ns" every T ms (0: off)
 *   nxprobe.dirty_mb=M   size of a separate buffer to keep dirtying (MiB)
 *   nxprobe.dirty_pct=P  share of that buffer rewritten per second (%)
 *
 * The dirty buffer (both dirty options non-zero) is verifiable from dom0: every
 * write stamps its page (dirty_write), a separate "cursor page" says how far the
 * writes got, and the report lists the buffer's and the cursor page's frames as
 * runs (protocol version 2; without a dirty buffer the report is version 1,
 * byte for byte as before).  See harness/agent/nxagent/dirty.py for the layout.
 * argv only (tests): --once (exit 0 after "ready"),
 *                    --hash (print "<sha256> <crc32>" of stdin and exit),
 *                    --dump=W (with --once and a dirty buffer: W page writes, then
 *                    the raw cursor page and buffer after "NXDUMP <bytes>").
 *
 * Build: gcc -static -O2 -Wall -Wextra -o probe probe.c
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096
#define MARKER_BYTES 64
#define NONCE_BYTES 16
#define MAX_PAGES (1UL << 20) /* keeps "idx=<i>" inside the 64-byte marker */
#define DIRTY_PERIOD_MS 10
#define NS_PER_MS 1000000ULL
#define NS_PER_S 1000000000ULL
#define PROTOCOL_VERSION 1       /* a report without a dirty buffer */
#define PROTOCOL_VERSION_DIRTY 2 /* with one: adds the "dirty" and "druns" events */
#define DIRTY_HEADER_BYTES 40    /* magic, nonce, generation, index */
#define DIRTY_BODY_OFFSET 40     /* bytes 40..63 zero, then the 16-byte stamp repeated */
#define DIRTY_STAMP_OFFSET 64
#define RUNS_PER_LINE 32         /* [pfn,len] pairs per "druns" line: < 1023 chars */

/* ------------------------------------------------------------------ SHA-256 */

typedef struct {
    uint32_t h[8];
    uint64_t total;
    uint8_t buf[64];
    size_t used;
} sha256_ctx;

static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror32(uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }

static void sha256_init(sha256_ctx *c)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, iv, sizeof iv);
    c->total = 0;
    c->used = 0;
}

static void sha256_block(sha256_ctx *c, const uint8_t *p)
{
    uint32_t w[64], s[8], t1, t2;
    int i;

    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (i = 16; i < 64; i++)
        w[i] = w[i - 16] + w[i - 7] +
               (ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3)) +
               (ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10));
    memcpy(s, c->h, sizeof s);
    for (i = 0; i < 64; i++) {
        t1 = s[7] + (ror32(s[4], 6) ^ ror32(s[4], 11) ^ ror32(s[4], 25)) +
             ((s[4] & s[5]) ^ (~s[4] & s[6])) + SHA_K[i] + w[i];
        t2 = (ror32(s[0], 2) ^ ror32(s[0], 13) ^ ror32(s[0], 22)) +
             ((s[0] & s[1]) ^ (s[0] & s[2]) ^ (s[1] & s[2]));
        memmove(s + 1, s, 7 * sizeof s[0]);
        s[4] += t1;
        s[0] = t1 + t2;
    }
    for (i = 0; i < 8; i++)
        c->h[i] += s[i];
}

static void sha256_update(sha256_ctx *c, const void *data, size_t len)
{
    const uint8_t *p = data;

    c->total += len;
    while (len > 0) {
        size_t take = 64 - c->used < len ? 64 - c->used : len;
        memcpy(c->buf + c->used, p, take);
        c->used += take;
        p += take;
        len -= take;
        if (c->used == 64) {
            sha256_block(c, c->buf);
            c->used = 0;
        }
    }
}

/* Writes the digest as 64 lowercase hex digits plus NUL into hex[65]. */
static void sha256_final_hex(sha256_ctx *c, char hex[65])
{
    uint64_t bits = c->total * 8;
    uint8_t pad = 0x80, len_be[8];
    int i;

    sha256_update(c, &pad, 1);
    pad = 0;
    while (c->used != 56)
        sha256_update(c, &pad, 1);
    for (i = 0; i < 8; i++)
        len_be[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(c, len_be, 8);
    for (i = 0; i < 8; i++)
        snprintf(hex + 8 * i, 9, "%08" PRIx32, c->h[i]);
}

static void sha256_hex(const void *data, size_t len, char hex[65])
{
    sha256_ctx c;

    sha256_init(&c);
    sha256_update(&c, data, len);
    sha256_final_hex(&c, hex);
}

/* ------------------------------------------------------------ CRC-32/IEEE */

static uint32_t crc32_update(uint32_t crc, const void *data, size_t len)
{
    const uint8_t *p = data;
    int k;

    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* ------------------------------------------------------------------ output */

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return; /* nowhere left to report to */
        buf += n;
        len -= (size_t)n;
    }
}

/* Emits "NXPROBE <json> *<crc32>\n" with a single write() so that it is
 * unlikely to be split by other console output. */
__attribute__((format(printf, 1, 2))) static void emit(const char *fmt, ...)
{
    char line[1200];
    const size_t head = sizeof "NXPROBE " - 1, room = 1024;
    va_list ap;
    int n;

    memcpy(line, "NXPROBE ", head);
    va_start(ap, fmt);
    n = vsnprintf(line + head, room, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= room)
        n = (int)room - 1;
    n += (int)head;
    n += snprintf(line + n, sizeof line - (size_t)n, " *%08" PRIx32 "\n",
                  crc32_update(0, line + head, (size_t)n - head));
    write_all(STDOUT_FILENO, line, (size_t)n);
}

/* Copies src into a JSON string body (without quotes), escaping as needed. */
static void json_escape(char *dst, size_t size, const char *src)
{
    size_t o = 0;

    for (; *src && o + 7 < size; src++) {
        unsigned char ch = (unsigned char)*src;
        if (ch == '"' || ch == '\\') {
            dst[o++] = '\\';
            dst[o++] = (char)ch;
        } else if (ch < 0x20 || ch >= 0x7f) {
            o += (size_t)snprintf(dst + o, size - o, "\\u%04x", ch);
        } else {
            dst[o++] = (char)ch;
        }
    }
    dst[o] = '\0';
}

__attribute__((format(printf, 1, 2), noreturn)) static void fatal(const char *fmt, ...)
{
    char msg[400], esc[800];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_escape(esc, sizeof esc, msg);
    emit("{\"ev\":\"error\",\"msg\":\"%s\"}", esc);
    exit(1);
}

static void to_hex(const uint8_t *data, size_t len, char *hex)
{
    static const char digits[] = "0123456789abcdef";
    size_t i;

    for (i = 0; i < len; i++) {
        hex[2 * i] = digits[data[i] >> 4];
        hex[2 * i + 1] = digits[data[i] & 15];
    }
    hex[2 * len] = '\0';
}

/* ----------------------------------------------------------------- options */

enum { OPT_PAGES, OPT_TICK_MS, OPT_DIRTY_PCT, OPT_DIRTY_MB, OPT_COUNT };

static const struct {
    const char *key;
    unsigned long min, max, dflt;
} OPTS[OPT_COUNT] = {
    [OPT_PAGES] = {"pages", 1, MAX_PAGES, 64},
    [OPT_TICK_MS] = {"tick_ms", 0, 3600000, 0},
    [OPT_DIRTY_PCT] = {"dirty_pct", 0, 1000, 0},
    [OPT_DIRTY_MB] = {"dirty_mb", 0, 65536, 0},
};

struct config {
    unsigned long val[OPT_COUNT];
    int set[OPT_COUNT];
    int once, hash, dump;
    unsigned long dump_writes;
};

/* Applies "nxprobe.<key>=<value>" unless the key is already set.
 * Returns 0 if tok is not an nxprobe option; fatal() on a bad one. */
static int apply_option(struct config *cfg, const char *tok)
{
    static const char prefix[] = "nxprobe.";
    const char *eq;
    char *end;
    unsigned long v;
    int i;

    if (strncmp(tok, prefix, sizeof prefix - 1) != 0)
        return 0;
    tok += sizeof prefix - 1;
    eq = strchr(tok, '=');
    for (i = 0; i < OPT_COUNT; i++)
        if (eq && (size_t)(eq - tok) == strlen(OPTS[i].key) &&
            strncmp(tok, OPTS[i].key, (size_t)(eq - tok)) == 0)
            break;
    if (i == OPT_COUNT)
        fatal("unknown option nxprobe.%.60s", tok);
    if (cfg->set[i])
        return 1;
    errno = 0;
    v = strtoul(eq + 1, &end, 10);
    if (errno || end == eq + 1 || *end || eq[1] == '-' || v < OPTS[i].min || v > OPTS[i].max)
        fatal("bad value for nxprobe.%s: '%.40s' (allowed %lu..%lu)", OPTS[i].key, eq + 1,
              OPTS[i].min, OPTS[i].max);
    cfg->val[i] = v;
    cfg->set[i] = 1;
    return 1;
}

static void parse_argv(struct config *cfg, int argc, char **argv)
{
    int i;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--once") == 0)
            cfg->once = 1;
        else if (strcmp(argv[i], "--hash") == 0)
            cfg->hash = 1;
        else if (strncmp(argv[i], "--dump=", 7) == 0)
            cfg->dump = 1, cfg->dump_writes = strtoul(argv[i] + 7, NULL, 10);
        else if (!apply_option(cfg, argv[i]))
            fatal("unknown argument '%.60s'", argv[i]);
    }
}

static void parse_cmdline(struct config *cfg)
{
    char buf[4096], *tok, *save = NULL;
    ssize_t n;
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return; /* no /proc: argv and defaults only */
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = '\0';
    for (tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save))
        apply_option(cfg, tok);
}

static void load_config(struct config *cfg, int argc, char **argv)
{
    int i;

    memset(cfg, 0, sizeof *cfg);
    parse_argv(cfg, argc, argv);
    if (!cfg->hash)
        parse_cmdline(cfg);
    for (i = 0; i < OPT_COUNT; i++)
        if (!cfg->set[i])
            cfg->val[i] = OPTS[i].dflt;
}

/* ------------------------------------------------------------ page content */

static int read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* getrandom() without blocking on an uninitialised pool, then /dev/urandom:
 * the nonce only needs to differ between boots. */
static void get_nonce(uint8_t nonce[NONCE_BYTES])
{
    int gr_errno, fd;

    if (getrandom(nonce, NONCE_BYTES, GRND_NONBLOCK) == NONCE_BYTES)
        return;
    gr_errno = errno;
    fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0 && read_full(fd, nonce, NONCE_BYTES) == 0) {
        close(fd);
        return;
    }
    fatal("no randomness: getrandom: %s; /dev/urandom: %s", strerror(gr_errno),
          strerror(errno));
}

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;
    int i;

    for (i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void store_le64(uint8_t *p, uint64_t v)
{
    int i;

    for (i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* seed = splitmix64(n0 ^ splitmix64(n1 ^ index)), n0/n1 = nonce halves (LE);
 * a zero seed (a fixed point of xorshift) becomes the golden-ratio constant. */
static uint64_t page_seed(const uint8_t nonce[NONCE_BYTES], uint64_t index)
{
    uint64_t s = splitmix64(load_le64(nonce) ^ splitmix64(load_le64(nonce + 8) ^ index));
    return s ? s : 0x9E3779B97F4A7C15ULL;
}

static uint64_t xorshift64star(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* Bytes 0..63: "NXPROBE-PAGE nonce=<hex> idx=<i>" NUL-padded; then
 * xorshift64* outputs stored little-endian. */
static void fill_page(uint8_t *page, const uint8_t nonce[NONCE_BYTES],
                      const char *nonce_hex, unsigned long index)
{
    uint64_t state = page_seed(nonce, index);
    char marker[96];
    int len = snprintf(marker, sizeof marker, "NXPROBE-PAGE nonce=%s idx=%lu", nonce_hex, index);
    size_t off;

    memset(page, 0, MARKER_BYTES);
    memcpy(page, marker, len < MARKER_BYTES ? (size_t)len : MARKER_BYTES - 1);
    for (off = MARKER_BYTES; off < PAGE_BYTES; off += 8)
        store_le64(page + off, xorshift64star(&state));
}

static uint8_t *map_locked(size_t bytes, const char *what)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

    if (p == MAP_FAILED)
        fatal("mmap %s (%zu bytes): %s", what, bytes, strerror(errno));
    /* Keep khugepaged from collapsing (and so moving) the pages later. */
    madvise(p, bytes, MADV_NOHUGEPAGE);
    if (mlock(p, bytes) != 0)
        fatal("mlock %s (%zu bytes): %s", what, bytes, strerror(errno));
    return p;
}

static uint64_t page_pfn(int pagemap_fd, const void *addr)
{
    uint64_t entry;
    off_t off = (off_t)((uintptr_t)addr / PAGE_BYTES * sizeof entry);

    if (pread(pagemap_fd, &entry, sizeof entry, off) != (ssize_t)sizeof entry)
        fatal("read /proc/self/pagemap: %s", strerror(errno));
    if (!(entry >> 63))
        fatal("page at %p not present in pagemap", addr);
    return entry & ((1ULL << 55) - 1);
}

/* ------------------------------------------------------------- the report */

/* The page lines; the digest of their hashes goes to digest[65] for "ready". */
static void report_pages(const uint8_t *pages, unsigned long count, char digest[65])
{
    char hex[65];
    sha256_ctx all;
    unsigned long i;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        fatal("open /proc/self/pagemap: %s", strerror(errno));
    sha256_init(&all);
    for (i = 0; i < count; i++) {
        const uint8_t *page = pages + i * PAGE_BYTES;
        uint64_t pfn = page_pfn(fd, page);
        sha256_hex(page, PAGE_BYTES, hex);
        sha256_update(&all, hex, 64);
        emit("{\"ev\":\"page\",\"i\":%lu,\"pfn\":%" PRIu64 ",\"sha256\":\"%s\"}", i, pfn, hex);
    }
    close(fd);
    sha256_final_hex(&all, digest);
}

/* Emits one "druns" line: runs [pfn, len] (len < 0: descending pfns) covering
 * buffer pages first..first+covered-1. */
static void emit_runs(uint64_t line, uint64_t first, const int64_t (*runs)[2], int count)
{
    char text[1000];
    size_t o = 0;
    int i;

    for (i = 0; i < count; i++)
        o += (size_t)snprintf(text + o, sizeof text - o, "%s[%" PRId64 ",%" PRId64 "]", i ? "," : "",
                              runs[i][0], runs[i][1]);
    emit("{\"ev\":\"druns\",\"line\":%" PRIu64 ",\"first\":%" PRIu64 ",\"runs\":[%s]}", line, first,
         text);
}

/* The dirty buffer's frames as runs of consecutive pfns, RUNS_PER_LINE a line,
 * after a "dirty" line with the buffer's size and the cursor page's pfn. */
static void report_dirty(const uint8_t *buf, uint64_t pages, uint64_t pct, const uint8_t *cursor_page)
{
    int64_t runs[RUNS_PER_LINE][2];
    uint64_t i, line = 0, first = 0, covered = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC), n = 0;

    if (fd < 0)
        fatal("open /proc/self/pagemap: %s", strerror(errno));
    emit("{\"ev\":\"dirty\",\"pages\":%" PRIu64 ",\"pct\":%" PRIu64 ",\"cursor_pfn\":%" PRIu64 "}",
         pages, pct, page_pfn(fd, cursor_page));
    for (i = 0; i < pages; i++) {
        int64_t pfn = (int64_t)page_pfn(fd, buf + i * PAGE_BYTES);
        int64_t *run = n ? runs[n - 1] : NULL;
        if (run && run[1] > 0 && pfn == run[0] + run[1])
            run[1]++;
        else if (run && run[1] == 1 && pfn == run[0] - 1)
            run[1] = -2;
        else if (run && run[1] < 0 && pfn == run[0] + run[1])
            run[1]--;
        else {
            if (n == RUNS_PER_LINE) {
                emit_runs(line++, first, (const int64_t(*)[2])runs, n);
                first += covered;
                covered = 0;
                n = 0;
            }
            runs[n][0] = pfn;
            runs[n][1] = 1;
            n++;
        }
        covered++;
    }
    if (n)
        emit_runs(line++, first, (const int64_t(*)[2])runs, n);
    close(fd);
}

/* ----------------------------------------------------- ticks and dirtying */

/* A dirty page: "NXDIRTY1", the nonce, generation and index (LE u64) in bytes
 * 0..39, zeros in 40..63, then the 16-byte stamp of (nonce, generation, index)
 * repeated.  The body is written first and the header last, so a page caught
 * mid-write (or never re-sent) holds an old header or a body that does not
 * match its header.  The cursor page: "NXCURSR1", the nonce, then LE u64s
 * generation, cursor, writes (completed page writes since the fill), pages.
 * After `writes` completed writes, generation = 1 + writes / pages and cursor =
 * writes % pages: pages before the cursor hold that generation, the others one
 * less.  `writes` is stored last, so it is the cursor page's authority. */
static const char DIRTY_MAGIC[8] = {'N', 'X', 'D', 'I', 'R', 'T', 'Y', '1'};
static const char CURSOR_MAGIC[8] = {'N', 'X', 'C', 'U', 'R', 'S', 'R', '1'};
enum { CUR_GENERATION = 24, CUR_CURSOR = 32, CUR_WRITES = 40, CUR_PAGES = 48 };

struct dirtier {
    uint8_t *buf, *cursor_page;
    const uint8_t *nonce;
    uint64_t pages, pct, cursor, carry, generation, writes;
};

/* Keeps the compiler from moving stores across it (x86 keeps their order). */
#define STORE_BARRIER() __atomic_signal_fence(__ATOMIC_SEQ_CST)
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the dirty page layout is little-endian"
#endif

/* One aligned 8-byte store: a paused vCPU never leaves it half written. */
static void store_word(uint8_t *p, uint64_t v) { __atomic_store_n((uint64_t *)(void *)p, v, __ATOMIC_RELAXED); }

static void dirty_stamp(const uint8_t nonce[NONCE_BYTES], uint64_t generation, uint64_t index,
                        uint8_t stamp[16])
{
    uint64_t a = splitmix64(load_le64(nonce) ^
                            splitmix64(load_le64(nonce + 8) ^
                                       splitmix64(generation ^ splitmix64(index ^ 0x4E58444952545931ULL))));

    store_le64(stamp, a);
    store_le64(stamp + 8, splitmix64(a));
}

static void dirty_write(const struct dirtier *d, uint64_t index, uint64_t generation)
{
    uint8_t *page = d->buf + index * PAGE_BYTES, stamp[16];
    size_t off;

    dirty_stamp(d->nonce, generation, index, stamp);
    memset(page + DIRTY_BODY_OFFSET, 0, DIRTY_STAMP_OFFSET - DIRTY_BODY_OFFSET);
    for (off = DIRTY_STAMP_OFFSET; off < PAGE_BYTES; off += sizeof stamp)
        memcpy(page + off, stamp, sizeof stamp);
    STORE_BARRIER(); /* body first, header last */
    memcpy(page, DIRTY_MAGIC, sizeof DIRTY_MAGIC);
    memcpy(page + 8, d->nonce, NONCE_BYTES);
    store_word(page + 32, index);
    store_word(page + 24, generation);
    STORE_BARRIER();
}

static void cursor_store(const struct dirtier *d)
{
    store_word(d->cursor_page + CUR_GENERATION, d->generation);
    store_word(d->cursor_page + CUR_CURSOR, d->cursor);
    STORE_BARRIER();
    store_word(d->cursor_page + CUR_WRITES, d->writes);
    STORE_BARRIER();
}

/* Every page at generation 0; the loop then writes generation 1 from page 0. */
static void dirty_fill(struct dirtier *d)
{
    uint64_t i;

    for (i = 0; i < d->pages; i++)
        dirty_write(d, i, 0);
    memset(d->cursor_page, 0, PAGE_BYTES);
    memcpy(d->cursor_page, CURSOR_MAGIC, sizeof CURSOR_MAGIC);
    memcpy(d->cursor_page + 8, d->nonce, NONCE_BYTES);
    store_word(d->cursor_page + CUR_PAGES, d->pages);
    d->cursor = d->writes = 0;
    d->generation = 1;
    cursor_store(d);
}

/* One page write at the cursor, then the cursor page. */
static void dirty_advance(struct dirtier *d)
{
    dirty_write(d, d->cursor, d->generation);
    d->writes++;
    if (++d->cursor == d->pages) {
        d->cursor = 0;
        d->generation++;
    }
    cursor_store(d);
}

/* Tests (argv --dump=W): W page writes at once, then "NXDUMP <bytes>" and the raw
 * cursor page and buffer, so the layout is checked against the harness's model. */
static void dirty_dump(struct dirtier *d, unsigned long writes)
{
    char line[64];

    while (writes--)
        dirty_advance(d);
    write_all(STDOUT_FILENO, line,
              (size_t)snprintf(line, sizeof line, "NXDUMP %" PRIu64 "\n", (d->pages + 1) * PAGE_BYTES));
    write_all(STDOUT_FILENO, (const char *)d->cursor_page, PAGE_BYTES);
    write_all(STDOUT_FILENO, (const char *)d->buf, d->pages * PAGE_BYTES);
}

/* Rewrites the pages due in one period of period_ms, cycling through buf. */
static void dirty_step(struct dirtier *d, uint64_t period_ms)
{
    uint64_t due;

    d->carry += d->pages * d->pct * period_ms; /* in page * 1e-5 units */
    due = d->carry / 100000;
    d->carry %= 100000;
    while (due--)
        dirty_advance(d);
}

static uint64_t now_ns(clockid_t clk)
{
    struct timespec ts;

    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t deadline_ns)
{
    struct timespec ts = {.tv_sec = (time_t)(deadline_ns / NS_PER_S),
                          .tv_nsec = (long)(deadline_ns % NS_PER_S)};

    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void print_tick(uint64_t seq)
{
    char line[96];
    uint64_t mono = now_ns(CLOCK_MONOTONIC), real = now_ns(CLOCK_REALTIME);
    int n = snprintf(line, sizeof line, "NXTICK %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", seq,
                     mono, real);

    write_all(STDOUT_FILENO, line, (size_t)n);
}

/* Periodic loop; after a stall (e.g. a paused or migrated guest) longer than
 * one period it restarts from now instead of firing the missed periods. */
static __attribute__((noreturn)) void run_periodic(uint64_t tick_ms, struct dirtier *d)
{
    uint64_t period_ms = tick_ms ? tick_ms : DIRTY_PERIOD_MS;
    uint64_t period_ns = period_ms * NS_PER_MS, next = now_ns(CLOCK_MONOTONIC), seq = 0, now;

    for (;;) {
        next += period_ns;
        sleep_until(next);
        now = now_ns(CLOCK_MONOTONIC);
        if (now > next + period_ns)
            next = now;
        if (d->buf)
            dirty_step(d, period_ms);
        if (tick_ms)
            print_tick(seq++);
    }
}

static int hash_stdin(void)
{
    sha256_ctx c;
    char buf[65536], hex[65];
    uint32_t crc = 0;
    ssize_t n;

    sha256_init(&c);
    while ((n = read(STDIN_FILENO, buf, sizeof buf)) != 0) {
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return 1;
        sha256_update(&c, buf, (size_t)n);
        crc = crc32_update(crc, buf, (size_t)n);
    }
    sha256_final_hex(&c, hex);
    printf("%s %08" PRIx32 "\n", hex, crc);
    return 0;
}

int main(int argc, char **argv)
{
    struct config cfg;
    struct dirtier dirt = {0};
    uint8_t nonce[NONCE_BYTES], *pages;
    char nonce_hex[2 * NONCE_BYTES + 1], digest[65];
    int dirty;
    unsigned long i, npages;

    load_config(&cfg, argc, argv);
    if (cfg.hash)
        return hash_stdin();
    if (sysconf(_SC_PAGESIZE) != PAGE_BYTES)
        fatal("page size is %ld, need %d", sysconf(_SC_PAGESIZE), PAGE_BYTES);
    npages = cfg.val[OPT_PAGES];
    dirty = cfg.val[OPT_DIRTY_MB] && cfg.val[OPT_DIRTY_PCT];
    get_nonce(nonce);
    to_hex(nonce, NONCE_BYTES, nonce_hex);
    emit("{\"ev\":\"hello\",\"v\":%d,\"nonce\":\"%s\",\"pages\":%lu,\"page_size\":%d,"
         "\"tick_ms\":%lu,\"dirty_mb\":%lu,\"dirty_pct\":%lu}",
         dirty ? PROTOCOL_VERSION_DIRTY : PROTOCOL_VERSION, nonce_hex, npages, PAGE_BYTES, cfg.val[OPT_TICK_MS],
         cfg.val[OPT_DIRTY_MB], cfg.val[OPT_DIRTY_PCT]);

    pages = map_locked(npages * PAGE_BYTES, "probe pages");
    for (i = 0; i < npages; i++)
        fill_page(pages + i * PAGE_BYTES, nonce, nonce_hex, i);
    if (dirty) {
        dirt.pages = (uint64_t)cfg.val[OPT_DIRTY_MB] * (1024 * 1024 / PAGE_BYTES);
        dirt.pct = cfg.val[OPT_DIRTY_PCT];
        dirt.nonce = nonce;
        dirt.buf = map_locked(dirt.pages * PAGE_BYTES, "dirty buffer");
        dirt.cursor_page = map_locked(PAGE_BYTES, "cursor page");
        dirty_fill(&dirt);
    }
    report_pages(pages, npages, digest);
    if (dirty)
        report_dirty(dirt.buf, dirt.pages, dirt.pct, dirt.cursor_page);
    emit("{\"ev\":\"ready\",\"pages\":%lu,\"digest\":\"%s\"}", npages, digest);

    if (cfg.once) {
        if (cfg.dump && dirt.buf)
            dirty_dump(&dirt, cfg.dump_writes);
        return 0;
    }
    if (cfg.val[OPT_TICK_MS] || dirt.buf)
        run_periodic(cfg.val[OPT_TICK_MS], &dirt);
    for (;;)
        pause();
}
