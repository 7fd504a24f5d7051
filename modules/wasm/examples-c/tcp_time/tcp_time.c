/*
 * tcp_time: how long a TCP connect to host:port takes, `count` times.
 *
 * An example IMN WebAssembly module in freestanding C: no libc, only the "imn" imports
 * of imn.h. Parameters (checked by the backend against module.json's schema, and again
 * here: every input is hostile):
 *
 *   host        string, required, 1 to 253 bytes: a name or an address literal
 *   port        integer, required, 1 to 65535
 *   count       integer, 1 to 10, default 3: connects made, one after the other
 *   timeout_ms  integer, 1 to 10000, default 2000: for each connect
 *
 * The host is resolved once, by the agent's resolver (for a literal, that is the literal
 * itself), and every attempt connects to the first address it gives, so that the times
 * are the connects' alone. Each attempt reads the monotonic clock, calls tcp_connect,
 * reads the clock again and closes the connection (nothing is sent). The result:
 *
 *   {"host":"...","port":N,"sent":N,"connected":N,"times_ms":[...],
 *    "min_ms":N,"avg_ms":N,"max_ms":N,"errors":["..."]}
 *
 * `sent` is the attempts made, `times_ms` the connected ones' times (ms, 3 decimals,
 * written with integer arithmetic), min/avg/max only when one connected, `errors` the
 * host's messages of the failed resolution or attempts (at most 10). An attempt is not
 * made once the run's deadline is near (an error says so), nor after the agent's policy
 * refused the address. Bad parameters fail the run with a log line naming the parameter.
 *
 * What a run sends, for module.json's limits: the lookup (2 packets, which the host
 * counts as 2 x (the name's length + 40) bytes, even for a literal), then at most 10
 * connects (1 packet each), one socket open at a time.
 */

#include <stddef.h>

#include "imn.h"

#define HOST_MAX 253
#define PARAMS_CAP 4096
#define KEY_CAP 16
#define COUNT_MAX 10
#define ERRORS_MAX 10
/* Bytes of one host error message kept (a longer one is cut, "..." added). */
#define ERROR_CAP 200
#define MSG_CAP 512
/* Large enough for the longest result: the host escaped (6 x 253), 10 times, 13 numbers
 * and 10 errors escaped (6 x 203 each). */
#define OUT_CAP (16 * 1024)
/* Kept back from the run's deadline to write the result. */
#define RESERVE_MS 100

/* Calls clang may emit for copies and zeroing even in freestanding code. */
void *memcpy(void *restrict dst, const void *restrict src, size_t n) {
    uint8_t *d = dst;
    const uint8_t *s = src;
    for (size_t i = 0; i < n; i++) d[i] = s[i];
    return dst;
}

void *memset(void *dst, int c, size_t n) {
    uint8_t *d = dst;
    for (size_t i = 0; i < n; i++) d[i] = (uint8_t)c;
    return dst;
}

static uint32_t cstr_len(const char *s) {
    uint32_t n = 0;
    while (s[n]) n++;
    return n;
}

/* ---- UTF-8 ---------------------------------------------------------------------- */

/* The length (1 to 4) of the valid UTF-8 sequence at p, n >= 1 bytes available; 0 if
 * it is not valid; -1 if it is cut short by the end of the n bytes. */
static int utf8_len(const uint8_t *p, uint32_t n) {
    uint8_t c = p[0];
    uint8_t lo = 0x80, hi = 0xBF;
    uint32_t need;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c == 0xE0) {
        need = 3;
        lo = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
        need = 3;
    } else if (c == 0xED) { /* not the surrogates */
        need = 3;
        hi = 0x9F;
    } else if (c == 0xF0) {
        need = 4;
        lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
        need = 4;
    } else if (c == 0xF4) { /* at most U+10FFFF */
        need = 4;
        hi = 0x8F;
    } else {
        return 0;
    }
    for (uint32_t i = 1; i < need; i++) {
        if (i >= n) return -1;
        if (p[i] < lo || p[i] > hi) return 0;
        lo = 0x80;
        hi = 0xBF;
    }
    return (int)need;
}

/* Encodes a code point (at most U+10FFFF, not a surrogate) into out: its length. */
static uint32_t utf8_encode(uint32_t cp, uint8_t out[4]) {
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | (cp >> 18));
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- JSON writer ---------------------------------------------------------------- */

/* Appends to buf, never past cap; `over` once something did not fit (then nothing more
 * is written). Invariant: len <= cap. */
typedef struct {
    uint8_t *buf;
    uint32_t cap;
    uint32_t len;
    int over;
} Writer;

static void put(Writer *w, const uint8_t *p, uint32_t n) {
    if (w->over || w->cap - w->len < n) {
        w->over = 1;
        return;
    }
    for (uint32_t i = 0; i < n; i++) w->buf[w->len + i] = p[i];
    w->len += n;
}

static void put_byte(Writer *w, uint8_t c) { put(w, &c, 1); }

static void put_str(Writer *w, const char *s) { put(w, (const uint8_t *)s, cstr_len(s)); }

static void put_u64(Writer *w, uint64_t v) {
    uint8_t digits[20];
    uint32_t n = 0;
    do {
        digits[n++] = (uint8_t)('0' + v % 10);
        v /= 10;
    } while (v != 0 && n < sizeof digits);
    while (n > 0) put_byte(w, digits[--n]);
}

/* A duration in ns as ms with 3 decimals ("12.345"), rounded to the microsecond. */
static void put_ms(Writer *w, int64_t ns) {
    uint64_t us = ns <= 0 ? 0 : ((uint64_t)ns + 500) / 1000;
    uint64_t frac = us % 1000;
    put_u64(w, us / 1000);
    put_byte(w, '.');
    put_byte(w, (uint8_t)('0' + frac / 100));
    put_byte(w, (uint8_t)('0' + frac / 10 % 10));
    put_byte(w, (uint8_t)('0' + frac % 10));
}

/* s[0..n] as a JSON string: quotes, backslashes and control characters escaped; a byte
 * that is not valid UTF-8 becomes '?'; a sequence cut short at the end is left out. */
static void put_json_string(Writer *w, const uint8_t *s, uint32_t n) {
    static const char hex[] = "0123456789abcdef";
    uint32_t i = 0;
    put_byte(w, '"');
    while (i < n) {
        uint8_t c = s[i];
        if (c == '"' || c == '\\') {
            put_byte(w, '\\');
            put_byte(w, c);
            i++;
        } else if (c == '\n') {
            put_str(w, "\\n");
            i++;
        } else if (c == '\r') {
            put_str(w, "\\r");
            i++;
        } else if (c == '\t') {
            put_str(w, "\\t");
            i++;
        } else if (c < 0x20 || c == 0x7F) {
            put_str(w, "\\u00");
            put_byte(w, (uint8_t)hex[c >> 4]);
            put_byte(w, (uint8_t)hex[c & 15]);
            i++;
        } else if (c < 0x80) {
            put_byte(w, c);
            i++;
        } else {
            int l = utf8_len(s + i, n - i);
            if (l < 0) break;
            if (l == 0) {
                put_byte(w, '?');
                i++;
            } else {
                put(w, s + i, (uint32_t)l);
                i += (uint32_t)l;
            }
        }
    }
    put_byte(w, '"');
}

/* ---- JSON reader: one flat object of strings and integers ----------------------- */

/* Invariant: pos <= len; nothing is read at or past len. */
typedef struct {
    const uint8_t *p;
    uint32_t len;
    uint32_t pos;
} Reader;

static int peek(const Reader *r) { return r->pos < r->len ? r->p[r->pos] : -1; }

static int eat(Reader *r, uint8_t c) {
    if (peek(r) != c) return 0;
    r->pos++;
    return 1;
}

static void skip_ws(Reader *r) {
    for (;;) {
        int c = peek(r);
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return;
        r->pos++;
    }
}

static int is_digit(int c) { return c >= '0' && c <= '9'; }

/* Four hex digits; 0 if they are not there. */
static int read_hex4(Reader *r, uint32_t *v) {
    uint32_t x = 0;
    if (r->len - r->pos < 4) return 0;
    for (uint32_t i = 0; i < 4; i++) {
        uint8_t c = r->p[r->pos + i];
        uint32_t d;
        if (c >= '0' && c <= '9') {
            d = c - '0';
        } else if (c >= 'a' && c <= 'f') {
            d = c - 'a' + 10;
        } else if (c >= 'A' && c <= 'F') {
            d = c - 'A' + 10;
        } else {
            return 0;
        }
        x = x * 16 + d;
    }
    r->pos += 4;
    *v = x;
    return 1;
}

#define STR_BAD (-1)
#define STR_LONG (-2)

/* A JSON string (its quote next) decoded into out, at most cap bytes of valid UTF-8:
 * its length; STR_BAD if it is not a valid JSON string, STR_LONG if it is longer than
 * cap (read to its end all the same). */
static int32_t read_string(Reader *r, uint8_t *out, uint32_t cap) {
    uint32_t n = 0;
    int too_long = 0;
    if (!eat(r, '"')) return STR_BAD;
    for (;;) {
        uint8_t one[4];
        uint32_t k;
        int c = peek(r);
        if (c < 0x20) return STR_BAD; /* the end of the text, or a raw control character */
        if (c == '"') {
            r->pos++;
            break;
        }
        if (c == '\\') {
            uint32_t cp;
            r->pos++;
            c = peek(r);
            if (c < 0) return STR_BAD;
            r->pos++;
            switch (c) {
            case '"': cp = '"'; break;
            case '\\': cp = '\\'; break;
            case '/': cp = '/'; break;
            case 'b': cp = 8; break;
            case 'f': cp = 12; break;
            case 'n': cp = 10; break;
            case 'r': cp = 13; break;
            case 't': cp = 9; break;
            case 'u':
                if (!read_hex4(r, &cp)) return STR_BAD;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t low;
                    if (!eat(r, '\\') || !eat(r, 'u') || !read_hex4(r, &low)) return STR_BAD;
                    if (low < 0xDC00 || low > 0xDFFF) return STR_BAD;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    return STR_BAD; /* a lone low surrogate */
                }
                break;
            default: return STR_BAD;
            }
            k = utf8_encode(cp, one);
        } else {
            int l = utf8_len(r->p + r->pos, r->len - r->pos);
            if (l <= 0) return STR_BAD;
            k = (uint32_t)l;
            for (uint32_t i = 0; i < k; i++) one[i] = r->p[r->pos + i];
            r->pos += k;
        }
        if (too_long || cap - n < k) {
            too_long = 1;
        } else {
            for (uint32_t i = 0; i < k; i++) out[n + i] = one[i];
            n += k;
        }
    }
    return too_long ? STR_LONG : (int32_t)n;
}

/* A JSON number that is an integer: digits, optionally a fraction of zeros (3.0 is an
 * integer to JSON Schema); no exponent. 0 if it is not one. The magnitude saturates at
 * 10^15, beyond any range checked here. */
static int read_int(Reader *r, int64_t *v) {
    int neg = eat(r, '-');
    uint32_t start = r->pos;
    int64_t x = 0;
    while (is_digit(peek(r))) {
        if (x < 1000000000000000LL) x = x * 10 + (r->p[r->pos] - '0');
        r->pos++;
    }
    if (r->pos == start) return 0;
    if (r->p[start] == '0' && r->pos - start > 1) return 0; /* a leading zero */
    if (eat(r, '.')) {
        uint32_t f = r->pos;
        while (peek(r) == '0') r->pos++;
        if (r->pos == f || is_digit(peek(r))) return 0;
    }
    if (peek(r) == 'e' || peek(r) == 'E') return 0;
    *v = neg ? -x : x;
    return 1;
}

static int same(const uint8_t *a, int32_t n, const char *b) {
    uint32_t m = cstr_len(b);
    if (n < 0 || (uint32_t)n != m) return 0;
    for (uint32_t i = 0; i < m; i++)
        if (a[i] != (uint8_t)b[i]) return 0;
    return 1;
}

/* ---- the module ----------------------------------------------------------------- */

static uint8_t params_buf[PARAMS_CAP];
static uint8_t host[HOST_MAX];
static uint32_t host_len;
/* The address the attempts connect to: the first line of resolve's answer. */
static uint8_t addr[64];
static uint32_t addr_len;
static int64_t port, count = 3, timeout_ms = 2000;

static int64_t times_ns[COUNT_MAX];
static uint8_t errors[ERRORS_MAX][ERROR_CAP + 3];
static uint32_t error_len[ERRORS_MAX];
static uint32_t n_errors;

static uint8_t out_buf[OUT_CAP];
static uint8_t msg_buf[MSG_CAP];
static Writer msg = {msg_buf, MSG_CAP, 0, 0};

/* Whether an integer parameter was read into *v within [lo, hi]; else msg says why. */
static int int_param(Reader *r, const char *name, int64_t *v, int64_t lo, int64_t hi) {
    if (read_int(r, v) && *v >= lo && *v <= hi) return 1;
    put_str(&msg, "parameter ");
    put_str(&msg, name);
    put_str(&msg, ": must be an integer from ");
    put_u64(&msg, (uint64_t)lo);
    put_str(&msg, " to ");
    put_u64(&msg, (uint64_t)hi);
    return 0;
}

/* Reads the parameters from text[0..n]; 0 and a message in msg if they are not right. */
static int parse_params(const uint8_t *text, uint32_t n) {
    Reader r = {text, n, 0};
    uint8_t key[KEY_CAP];
    int seen_host = 0, seen_port = 0, seen_count = 0, seen_timeout = 0;
    skip_ws(&r);
    if (!eat(&r, '{')) goto not_json;
    skip_ws(&r);
    if (!eat(&r, '}')) {
        for (;;) {
            int32_t k;
            skip_ws(&r);
            if (peek(&r) != '"') goto not_json;
            k = read_string(&r, key, sizeof key);
            if (k == STR_BAD) goto not_json;
            skip_ws(&r);
            if (!eat(&r, ':')) goto not_json;
            skip_ws(&r);
            if (same(key, k, "host") && !seen_host) {
                int32_t h;
                seen_host = 1;
                if (peek(&r) != '"') {
                    put_str(&msg, "parameter host: must be a string");
                    return 0;
                }
                h = read_string(&r, host, sizeof host);
                if (h == STR_BAD) goto not_json;
                if (h == STR_LONG || h == 0) {
                    put_str(&msg, "parameter host: must be 1 to 253 bytes");
                    return 0;
                }
                host_len = (uint32_t)h;
            } else if (same(key, k, "port") && !seen_port) {
                seen_port = 1;
                if (!int_param(&r, "port", &port, 1, 65535)) return 0;
            } else if (same(key, k, "count") && !seen_count) {
                seen_count = 1;
                if (!int_param(&r, "count", &count, 1, COUNT_MAX)) return 0;
            } else if (same(key, k, "timeout_ms") && !seen_timeout) {
                seen_timeout = 1;
                if (!int_param(&r, "timeout_ms", &timeout_ms, 1, 10000)) return 0;
            } else {
                put_str(&msg, "parameters: unknown or repeated parameter ");
                if (k == STR_LONG)
                    put_str(&msg, "(a long name)");
                else
                    put_json_string(&msg, key, (uint32_t)k);
                return 0;
            }
            skip_ws(&r);
            if (eat(&r, ',')) continue;
            if (eat(&r, '}')) break;
            goto not_json;
        }
    }
    skip_ws(&r);
    if (r.pos != r.len) goto not_json;
    if (!seen_host || !seen_port) {
        put_str(&msg, seen_host ? "parameter port: required" : "parameter host: required");
        return 0;
    }
    return 1;
not_json:
    put_str(&msg, "parameters: not a flat JSON object of strings and integers (at byte ");
    put_u64(&msg, r.pos);
    put_str(&msg, ")");
    return 0;
}

static void add_error_text(const uint8_t *s, uint32_t n) {
    if (n_errors >= ERRORS_MAX) return;
    if (n > ERROR_CAP) n = ERROR_CAP;
    for (uint32_t i = 0; i < n; i++) errors[n_errors][i] = s[i];
    error_len[n_errors++] = n;
}

/* The host's message for a failed call, as an error of the result: at most ERROR_CAP
 * bytes, cut between two characters, "..." added when cut. */
static void add_host_error(const char *call, int32_t code) {
    static uint8_t text[ERROR_CAP + 4];
    int32_t len;
    uint32_t n, e;
    if (n_errors >= ERRORS_MAX) return;
    len = imn_last_error(text, (int32_t)sizeof text);
    if (len <= 0) {
        Writer w = {text, ERROR_CAP, 0, 0};
        put_str(&w, call);
        put_str(&w, " failed with code -");
        put_u64(&w, (uint64_t)(-(int64_t)code));
        add_error_text(text, w.len);
        return;
    }
    if ((uint32_t)len <= ERROR_CAP) {
        add_error_text(text, (uint32_t)len);
        return;
    }
    /* At least ERROR_CAP + 1 bytes were written: text[n] is the first byte left out;
     * while it continues a character, that character is left out too. */
    n = ERROR_CAP;
    while (n > 0 && (text[n] & 0xC0) == 0x80) n--;
    add_error_text(text, n);
    e = n_errors - 1; /* each slot has 3 bytes more than ERROR_CAP */
    errors[e][error_len[e]++] = '.';
    errors[e][error_len[e]++] = '.';
    errors[e][error_len[e]++] = '.';
}

/* The ms a call may take before the run's deadline (less RESERVE_MS); 0 when the
 * deadline is too near for another call, and then an error says how far the run got. */
static int64_t time_left(uint32_t made) {
    int64_t left = imn_deadline_ms() - RESERVE_MS;
    Writer e = {msg_buf, MSG_CAP, 0, 0};
    if (left >= 1) return left;
    put_str(&e, "deadline: stopped after ");
    put_u64(&e, made);
    put_str(&e, " of ");
    put_u64(&e, (uint64_t)count);
    put_str(&e, " attempts");
    add_error_text(e.buf, e.len);
    return 0;
}

/* Resolves host once into addr; 0 (and an error) if it does not resolve. */
static int resolve_host(void) {
    /* The answer goes to params_buf: the parameters were read. */
    int32_t r = imn_resolve(host, (int32_t)host_len, params_buf, PARAMS_CAP);
    uint32_t n = 0;
    if (r == IMN_E_TOO_SMALL) { /* the host's message, "needs N bytes", says less */
        static const char many[] = "resolve: more addresses than fit in 4096 bytes";
        add_error_text((const uint8_t *)many, sizeof many - 1);
        return 0;
    }
    if (r < 0) {
        add_host_error("resolve", r);
        return 0;
    }
    if ((uint32_t)r > PARAMS_CAP) r = PARAMS_CAP;
    while (n < (uint32_t)r && params_buf[n] != '\n') n++;
    if (n == 0 || n > sizeof addr) {
        static const char bad[] = "resolve: no address in the answer";
        add_error_text((const uint8_t *)bad, sizeof bad - 1);
        return 0;
    }
    for (uint32_t i = 0; i < n; i++) addr[i] = params_buf[i];
    addr_len = n;
    return 1;
}

static int32_t fail(void) {
    imn_log(IMN_LOG_ERROR, msg.buf, (int32_t)msg.len);
    return 1;
}

__attribute__((export_name("run"))) int32_t run(void) {
    int32_t n = imn_params(params_buf, PARAMS_CAP);
    uint32_t sent = 0, connected = 0;
    Writer w = {out_buf, OUT_CAP, 0, 0};

    if (n < 0 || n > PARAMS_CAP) {
        put_str(&msg, "parameters: at most 4096 bytes");
        return fail();
    }
    if (!parse_params(params_buf, (uint32_t)n)) return fail();

    if (time_left(0) > 0 && resolve_host()) {
        for (uint32_t i = 0; i < (uint32_t)count && i < COUNT_MAX; i++) {
            int64_t left = time_left(i), wait = timeout_ms, t0, t1;
            int32_t h;
            if (left == 0) break;
            if (wait > left) wait = left;
            t0 = imn_clock_mono_ns();
            h = imn_tcp_connect(addr, (int32_t)addr_len, (int32_t)port, (int32_t)wait);
            t1 = imn_clock_mono_ns();
            sent++;
            if (h >= 0) {
                times_ns[connected++] = t1 > t0 ? t1 - t0 : 0;
                imn_close(h);
            } else {
                add_host_error("tcp_connect", h);
                /* Refused before anything was sent: trying again changes nothing. */
                if (h == IMN_E_POLICY_DENIED || h == IMN_E_INVALID) break;
            }
        }
    }

    put_str(&w, "{\"host\":");
    put_json_string(&w, host, host_len);
    put_str(&w, ",\"port\":");
    put_u64(&w, (uint64_t)port);
    put_str(&w, ",\"sent\":");
    put_u64(&w, sent);
    put_str(&w, ",\"connected\":");
    put_u64(&w, connected);
    put_str(&w, ",\"times_ms\":[");
    for (uint32_t i = 0; i < connected; i++) {
        if (i) put_byte(&w, ',');
        put_ms(&w, times_ns[i]);
    }
    put_byte(&w, ']');
    if (connected > 0) {
        int64_t min = times_ns[0], max = times_ns[0], sum = 0;
        for (uint32_t i = 0; i < connected; i++) {
            if (times_ns[i] < min) min = times_ns[i];
            if (times_ns[i] > max) max = times_ns[i];
            sum += times_ns[i];
        }
        put_str(&w, ",\"min_ms\":");
        put_ms(&w, min);
        put_str(&w, ",\"avg_ms\":");
        put_ms(&w, sum / connected);
        put_str(&w, ",\"max_ms\":");
        put_ms(&w, max);
    }
    put_str(&w, ",\"errors\":[");
    for (uint32_t i = 0; i < n_errors; i++) {
        if (i) put_byte(&w, ',');
        put_json_string(&w, errors[i], error_len[i]);
    }
    put_str(&w, "]}");
    if (w.over) {
        put_str(&msg, "result: longer than its buffer");
        return fail();
    }
    if (imn_result(w.buf, (int32_t)w.len) != 0) {
        int32_t len = imn_last_error(msg_buf, MSG_CAP);
        msg.len = len < 0 ? 0 : (uint32_t)len < MSG_CAP ? (uint32_t)len : MSG_CAP;
        return fail();
    }
    return 0;
}
