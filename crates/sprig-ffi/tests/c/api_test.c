/* Exercises the C API the way a host app does: compiled with `cc` against include/sprig.h and linked with the
 * host-built libsprig. Usage: api_test STORIES260K.bin TOK512.bin GOLDEN.txt CHAT_MODEL.gguf
 * Prints one line per failed check and exits non-zero if any failed. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "sprig.h"

static int failures = 0;

#define CHECK(cond, ...)                                          \
    do {                                                          \
        if (!(cond)) {                                            \
            failures++;                                           \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                         \
            fprintf(stderr, " (last error: %s)\n", sprig_last_error()); \
        }                                                         \
    } while (0)

/* Expects `call` to fail with `status` and leave a non-empty message. */
#define EXPECT_ERR(call, status)                                                        \
    do {                                                                                \
        SprigStatus s_ = (call);                                                        \
        CHECK(s_ == (status), #call " returned %d, expected %d", (int)s_, (int)(status)); \
        CHECK(strlen(sprig_last_error()) > 0, #call ": empty error message");            \
    } while (0)

struct buffer {
    char *data;
    size_t len, cap;
    int pieces;
    int stop_after; /* return false after this many pieces (0 = never) */
    int raw;        /* pieces may hold NUL bytes (a random byte-level model's text): no strlen check */
};

static bool collect(const char *text, size_t len, void *user_data) {
    struct buffer *b = user_data;
    if (!b->raw && strlen(text) != len) {
        failures++;
        fprintf(stderr, "FAIL: callback text length %zu != strlen %zu\n", len, strlen(text));
    }
    if (b->len + len + 1 > b->cap) {
        b->cap = (b->len + len + 1) * 2;
        b->data = realloc(b->data, b->cap);
    }
    memcpy(b->data + b->len, text, len);
    b->len += len;
    b->data[b->len] = 0;
    b->pieces++;
    return b->stop_after == 0 || b->pieces < b->stop_after;
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = calloc(1, n + 1);
    if (fread(s, 1, n, f) != (size_t)n) n = 0;
    fclose(f);
    return s;
}

/* --- cancellation from another thread --- */
struct cancel_ctx {
    SprigSession *session;
    struct buffer buf;
    volatile int go;
};

static void *canceller(void *arg) {
    struct cancel_ctx *c = arg;
    while (!c->go) usleep(100);
    CHECK(sprig_session_cancel(c->session) == SPRIG_STATUS_OK, "cancel from another thread");
    return NULL;
}

static bool slow_collect(const char *text, size_t len, void *user_data) {
    struct cancel_ctx *c = user_data;
    collect(text, len, &c->buf);
    if (c->buf.pieces == 5) c->go = 1;
    usleep(2000);
    return true;
}

/* --- a second generate on a busy session --- */
struct busy_ctx {
    SprigSession *session;
    int checked;
};

static void *second_generate(void *arg) {
    struct busy_ctx *c = arg;
    SprigStatus s = sprig_session_generate(c->session, "x", NULL, NULL, NULL, NULL);
    CHECK(s == SPRIG_STATUS_BUSY, "concurrent generate returned %d, expected BUSY", (int)s);
    return NULL;
}

static bool busy_collect(const char *text, size_t len, void *user_data) {
    (void)text;
    (void)len;
    struct busy_ctx *c = user_data;
    if (!c->checked) {
        c->checked = 1;
        pthread_t t;
        pthread_create(&t, NULL, second_generate, c);
        pthread_join(t, NULL);
    }
    return true;
}

/* --- two sessions of one model generating at the same time --- */
struct together_ctx {
    SprigModel *model;
    const SprigSamplingParams *params;
    volatile int *flowing; /* set by the first thread's first piece; the second starts then */
    int first;
    struct buffer buf;
    SprigGenerateResult res;
    SprigStatus status;
};

static bool together_collect(const char *text, size_t len, void *user_data) {
    struct together_ctx *c = user_data;
    collect(text, len, &c->buf);
    if (c->first) *c->flowing = 1;
    return true;
}

static void *together(void *arg) {
    struct together_ctx *c = arg;
    SprigSession *s = NULL;
    c->status = sprig_session_new(c->model, &s);
    if (c->status == SPRIG_STATUS_OK) {
        if (!c->first)
            while (!*c->flowing) usleep(50);
        c->status = sprig_session_generate(s, "Once upon a time", c->params, together_collect, c, &c->res);
        sprig_session_free(s);
    }
    if (c->first) *c->flowing = 1;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL.bin TOKENIZER.bin GOLDEN.txt CHAT_MODEL.gguf TEACHER_URL\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1], *tok_path = argv[2], *chat_path = argv[4], *teacher_url = argv[5];
    char *golden = read_file(argv[3]);
    CHECK(golden != NULL, "cannot read golden file");

    CHECK(sprig_abi_version() == SPRIG_ABI_VERSION, "ABI version mismatch");
    CHECK(strlen(sprig_version()) > 0, "empty version");

    /* Loading: bad arguments and bad files are errors with messages. */
    SprigModel *model = NULL;
    SprigModelOptions opts = sprig_model_options_default();
    opts.tokenizer_path = tok_path;
    opts.threads = 1;
    EXPECT_ERR(sprig_model_load(NULL, &opts, &model), SPRIG_STATUS_INVALID_ARGUMENT);
    EXPECT_ERR(sprig_model_load(model_path, &opts, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    EXPECT_ERR(sprig_model_load("/nonexistent/model.gguf", NULL, &model), SPRIG_STATUS_LOAD_FAILED);
    EXPECT_ERR(sprig_model_load("\xff\xfe.gguf", NULL, &model), SPRIG_STATUS_INVALID_ARGUMENT);
    EXPECT_ERR(sprig_model_load(model_path, NULL, &model), SPRIG_STATUS_LOAD_FAILED); /* no tokenizer */
    char corrupt[] = "/tmp/sprig-c-corrupt-XXXXXX";
    int fd = mkstemp(corrupt);
    CHECK(fd >= 0 && write(fd, "GGUF\x03\0\0\0garbage", 15) == 15, "write corrupt file");
    close(fd);
    EXPECT_ERR(sprig_model_load(corrupt, NULL, &model), SPRIG_STATUS_LOAD_FAILED);
    unlink(corrupt);
    SprigModelOptions gpu = opts;
    gpu.device = SPRIG_DEVICE_GPU;
    EXPECT_ERR(sprig_model_load(model_path, &gpu, &model), SPRIG_STATUS_DEVICE);
    gpu.device = 7;
    EXPECT_ERR(sprig_model_load(model_path, &gpu, &model), SPRIG_STATUS_INVALID_ARGUMENT);
    SprigModelOptions tight = opts;
    tight.memory_budget_mb = 1; /* stories260K with its 512-token KV cache needs ~2.5 MiB */
    EXPECT_ERR(sprig_model_load(model_path, &tight, &model), SPRIG_STATUS_OUT_OF_MEMORY);
    CHECK(model == NULL, "failed loads must not set the handle");

    CHECK(sprig_model_load(model_path, &opts, &model) == SPRIG_STATUS_OK, "load stories260K");
    uint32_t ctx = 0;
    CHECK(sprig_model_context_length(model, &ctx) == SPRIG_STATUS_OK && ctx == 512, "context %u", ctx);
    uint32_t device = 99;
    CHECK(sprig_model_device(model, &device) == SPRIG_STATUS_OK && device == SPRIG_DEVICE_CPU, "device %u", device);
    EXPECT_ERR(sprig_model_device(model, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    EXPECT_ERR(sprig_model_device(NULL, &device), SPRIG_STATUS_INVALID_HANDLE);

    /* Sessions and the golden text (greedy, the same as llama2.c's run.c). */
    SprigSession *session = NULL;
    EXPECT_ERR(sprig_session_new(NULL, &session), SPRIG_STATUS_INVALID_HANDLE);
    EXPECT_ERR(sprig_session_new(model, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    CHECK(sprig_session_new(model, &session) == SPRIG_STATUS_OK, "session_new");
    SprigSamplingParams greedy = sprig_sampling_params_default();
    greedy.temperature = 0;
    greedy.max_tokens = 252;
    struct buffer out = {0};
    SprigGenerateResult res;
    CHECK(sprig_session_generate(session, "Once upon a time", &greedy, collect, &out, &res) == SPRIG_STATUS_OK,
          "generate");
    char expected[8192];
    snprintf(expected, sizeof expected, "%s", golden ? golden : "");
    size_t el = strlen(expected);
    while (el > 0 && expected[el - 1] == '\n') expected[--el] = 0;
    char got[8192];
    snprintf(got, sizeof got, "Once upon a time%s", out.data ? out.data : "");
    CHECK(strcmp(got, expected) == 0, "golden text differs:\n--- got\n%s\n--- expected\n%s", got, expected);
    CHECK(res.prompt_tokens == 5 && res.stop_reason == SPRIG_STOP_LENGTH && res.generated_tokens == 252,
          "result: prompt %u generated %u stop %u", res.prompt_tokens, res.generated_tokens, res.stop_reason);

    /* Sessions of one model generating at the same time (two threads, the second starting once the first's text
       flows) decode as one batch, each with the golden text. */
    uint32_t batched = 0;
    for (int attempt = 0; attempt < 10 && batched == 0; attempt++) {
        volatile int flowing = 0;
        struct together_ctx tc[2] = {{model, &greedy, &flowing, 1, {0}, {0}, 0}, {model, &greedy, &flowing, 0, {0}, {0}, 0}};
        pthread_t th[2];
        for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, together, &tc[i]);
        for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
        for (int i = 0; i < 2; i++) {
            char tgot[8192];
            snprintf(tgot, sizeof tgot, "Once upon a time%s", tc[i].buf.data ? tc[i].buf.data : "");
            CHECK(tc[i].status == SPRIG_STATUS_OK && strcmp(tgot, expected) == 0,
                  "concurrent session %d: status %d, text:\n%s", i, (int)tc[i].status, tgot);
            batched += tc[i].res.batched_steps;
            free(tc[i].buf.data);
        }
    }
    CHECK(batched > 0, "two sessions generating at once never shared a step");
    CHECK(res.batched_steps == 0, "a session generating alone: %u batched steps", res.batched_steps);

    /* Speculative decoding keeps the golden text: prompt lookup, and the model drafting for itself (every
       draft accepted); bad arguments are refused. */
    for (int kind = SPRIG_SPEC_LOOKUP; kind <= SPRIG_SPEC_DRAFT_MODEL; kind++) {
        SprigSession *spec = NULL;
        CHECK(sprig_session_new(model, &spec) == SPRIG_STATUS_OK, "spec session");
        CHECK(sprig_session_set_speculation(spec, (uint32_t)kind, kind == SPRIG_SPEC_DRAFT_MODEL ? model : NULL,
                                            SPRIG_SPEC_MODE_ON, 5) == SPRIG_STATUS_OK, "set speculation %d", kind);
        struct buffer sout = {0};
        CHECK(sprig_session_generate(spec, "Once upon a time", &greedy, collect, &sout, NULL) == SPRIG_STATUS_OK,
              "speculative generate");
        char sgot[8192];
        snprintf(sgot, sizeof sgot, "Once upon a time%s", sout.data ? sout.data : "");
        CHECK(strcmp(sgot, expected) == 0, "speculative (%d) golden text differs:\n%s", kind, sgot);
        SprigSpecStats st;
        CHECK(sprig_session_speculation_stats(spec, &st) == SPRIG_STATUS_OK && st.passes > 0 &&
                  (kind != SPRIG_SPEC_DRAFT_MODEL || st.accepted == st.drafted),
              "spec stats %d: %llu drafted %llu accepted", kind, (unsigned long long)st.drafted,
              (unsigned long long)st.accepted);
        EXPECT_ERR(sprig_session_set_speculation(spec, SPRIG_SPEC_DRAFT_MODEL, NULL, SPRIG_SPEC_MODE_ON, 4),
                   SPRIG_STATUS_INVALID_ARGUMENT);
        EXPECT_ERR(sprig_session_set_speculation(spec, 7, NULL, SPRIG_SPEC_MODE_ON, 4), SPRIG_STATUS_INVALID_ARGUMENT);
        EXPECT_ERR(sprig_session_set_speculation(spec, SPRIG_SPEC_LOOKUP, NULL, 9, 4), SPRIG_STATUS_INVALID_ARGUMENT);
        EXPECT_ERR(sprig_session_set_speculation(spec, SPRIG_SPEC_LOOKUP, NULL, SPRIG_SPEC_MODE_ON, 0),
                   SPRIG_STATUS_INVALID_ARGUMENT);
        EXPECT_ERR(sprig_session_speculation_stats(spec, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
        CHECK(sprig_session_set_speculation(spec, SPRIG_SPEC_OFF, NULL, SPRIG_SPEC_MODE_AUTO, 8) == SPRIG_STATUS_OK,
              "speculation off");
        free(sout.data);
        CHECK(sprig_session_free(spec) == SPRIG_STATUS_OK, "free spec session");
    }
    EXPECT_ERR(sprig_session_set_speculation(NULL, SPRIG_SPEC_LOOKUP, NULL, SPRIG_SPEC_MODE_ON, 4),
               SPRIG_STATUS_INVALID_HANDLE);
    /* stories260K has no MTP head. */
    EXPECT_ERR(sprig_session_set_speculation(session, SPRIG_SPEC_MTP, NULL, SPRIG_SPEC_MODE_ON, 4),
               SPRIG_STATUS_INVALID_ARGUMENT);

    /* Bad generation arguments. */
    EXPECT_ERR(sprig_session_generate(session, NULL, NULL, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    EXPECT_ERR(sprig_session_generate(session, "caf\xc3", NULL, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    /* An empty prompt at the start generates from BOS alone (as llama.cpp does); later it is an error. */
    CHECK(sprig_session_reset(session) == SPRIG_STATUS_OK, "reset");
    SprigSamplingParams two = greedy;
    two.max_tokens = 2;
    CHECK(sprig_session_generate(session, "", &two, NULL, NULL, &res) == SPRIG_STATUS_OK && res.prompt_tokens == 1,
          "empty prompt at position 0");
    EXPECT_ERR(sprig_session_generate(session, "", NULL, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    SprigSamplingParams bad = greedy;
    bad.temperature = -1;
    EXPECT_ERR(sprig_session_generate(session, "x", &bad, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    bad = greedy;
    bad.top_p = 2;
    EXPECT_ERR(sprig_session_generate(session, "x", &bad, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    bad = greedy;
    bad.n_logit_bias = 3; /* with a NULL array */
    EXPECT_ERR(sprig_session_generate(session, "x", &bad, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    bad = greedy;
    const char *bad_stops[] = {"ok", NULL};
    bad.stop = bad_stops;
    bad.n_stop = 2;
    EXPECT_ERR(sprig_session_generate(session, "x", &bad, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);

    /* Stop strings (the golden text up to one of them, STOP_STRING), through a bias and a penalty window of 0
       that change nothing greedy picks. */
    CHECK(sprig_session_reset(session) == SPRIG_STATUS_OK, "reset");
    const char *tail = expected + strlen("Once upon a time");
    char stop_at[8];
    snprintf(stop_at, sizeof stop_at, "%.7s", tail + 40);
    const char *stops[] = {"never seen", stop_at};
    SprigLogitBias bias[] = {{511, -1.0f}};
    SprigSamplingParams stopping = greedy;
    stopping.stop = stops;
    stopping.n_stop = 2;
    stopping.logit_bias = bias;
    stopping.n_logit_bias = 1;
    stopping.penalty_last_n = 0;
    struct buffer upto = {0};
    CHECK(sprig_session_generate(session, "Once upon a time", &stopping, collect, &upto, &res) == SPRIG_STATUS_OK,
          "generate with stop strings");
    size_t want = (size_t)(strstr(tail, stop_at) - tail);
    CHECK(res.stop_reason == SPRIG_STOP_STRING && upto.data && strlen(upto.data) == want &&
              strncmp(upto.data, tail, want) == 0,
          "stop string `%s`: reason %u, text `%s`", stop_at, res.stop_reason, upto.data ? upto.data : "");
    SprigChatMessage msg = {"user", "hi"};
    EXPECT_ERR(sprig_session_chat(session, &msg, 1, NULL, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    EXPECT_ERR(sprig_session_chat(session, NULL, 0, NULL, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);

    /* The callback stops generation; a reset session reproduces the golden text. */
    CHECK(sprig_session_reset(session) == SPRIG_STATUS_OK, "reset");
    struct buffer few = {0};
    few.stop_after = 3;
    CHECK(sprig_session_generate(session, "Once upon a time", &greedy, collect, &few, &res) == SPRIG_STATUS_OK &&
              res.stop_reason == SPRIG_STOP_CANCELLED && few.pieces == 3,
          "callback stop: reason %u pieces %d", res.stop_reason, few.pieces);
    CHECK(few.data && strncmp(few.data, out.data, few.len) == 0, "stopped text is a prefix of the golden text");

    /* Cancel from another thread mid-stream. */
    CHECK(sprig_session_reset(session) == SPRIG_STATUS_OK, "reset");
    struct cancel_ctx cc = {session, {0}, 0};
    pthread_t t;
    pthread_create(&t, NULL, canceller, &cc);
    CHECK(sprig_session_generate(session, "Once upon a time", &greedy, slow_collect, &cc, &res) == SPRIG_STATUS_OK,
          "generate with cancel");
    pthread_join(t, NULL);
    CHECK(res.stop_reason == SPRIG_STOP_CANCELLED && cc.buf.pieces >= 5 && cc.buf.pieces < 252,
          "cancelled: reason %u after %d pieces", res.stop_reason, cc.buf.pieces);

    /* A second generate while one runs: BUSY, and the first one is unaffected. */
    CHECK(sprig_session_reset(session) == SPRIG_STATUS_OK, "reset");
    struct busy_ctx bc = {session, 0};
    SprigSamplingParams short_run = greedy;
    short_run.max_tokens = 4;
    CHECK(sprig_session_generate(session, "Once", &short_run, busy_collect, &bc, &res) == SPRIG_STATUS_OK &&
              bc.checked && res.generated_tokens == 4,
          "generate during busy check");

    /* Context: by default a session of 16 tokens drops old tokens and goes on (the result says how many). */
    SprigModel *small = NULL;
    SprigModelOptions small_opts = opts;
    small_opts.context_length = 16;
    CHECK(small_opts.context_policy == SPRIG_CONTEXT_TRUNCATE_MIDDLE && small_opts.prefix_cache_mb == 256,
          "default policy %u, prefix cache %u MiB", small_opts.context_policy, small_opts.prefix_cache_mb);
    CHECK(sprig_model_load(model_path, &small_opts, &small) == SPRIG_STATUS_OK, "load ctx 16");
    SprigSession *s16 = NULL;
    CHECK(sprig_session_new(small, &s16) == SPRIG_STATUS_OK, "session ctx 16");
    CHECK(sprig_session_generate(s16, "Once upon a time", &greedy, NULL, NULL, &res) == SPRIG_STATUS_OK &&
              res.stop_reason != SPRIG_STOP_CONTEXT_FULL && res.generated_tokens > 16 &&
              res.context_dropped_tokens > 0,
          "past the context: reason %u, %u generated, %u dropped", res.stop_reason, res.generated_tokens,
          res.context_dropped_tokens);
    CHECK(sprig_session_free(s16) == SPRIG_STATUS_OK && sprig_model_free(small) == SPRIG_STATUS_OK, "free ctx 16");
    /* With the error policy it stops when full, and a prompt that does not fit is an error. */
    small_opts.context_policy = SPRIG_CONTEXT_ERROR;
    CHECK(sprig_model_load(model_path, &small_opts, &small) == SPRIG_STATUS_OK, "load ctx 16");
    CHECK(sprig_session_new(small, &s16) == SPRIG_STATUS_OK, "session ctx 16");
    CHECK(sprig_session_generate(s16, "Once upon a time", &greedy, NULL, NULL, &res) == SPRIG_STATUS_OK &&
              res.stop_reason == SPRIG_STOP_CONTEXT_FULL,
          "context full: reason %u", res.stop_reason);
    CHECK(sprig_session_reset(s16) == SPRIG_STATUS_OK, "reset");
    EXPECT_ERR(sprig_session_generate(s16, "Once upon a time there was a girl named Lily who liked to play outside",
                                      &greedy, NULL, NULL, NULL),
               SPRIG_STATUS_CONTEXT_FULL);
    small_opts.context_policy = 7;
    SprigModel *bad_policy = NULL;
    EXPECT_ERR(sprig_model_load(model_path, &small_opts, &bad_policy), SPRIG_STATUS_INVALID_ARGUMENT);
    small_opts.context_policy = SPRIG_CONTEXT_TRUNCATE_MIDDLE;
    small_opts.kv_type = 9;
    EXPECT_ERR(sprig_model_load(model_path, &small_opts, &bad_policy), SPRIG_STATUS_INVALID_ARGUMENT);
    /* An int8 KV cache runs the golden prompt (its text may differ from f32's: not compared). */
    SprigModelOptions q8_opts = opts;
    q8_opts.kv_type = SPRIG_KV_Q8;
    SprigModel *q8_model = NULL;
    SprigSession *q8s = NULL;
    CHECK(sprig_model_load(model_path, &q8_opts, &q8_model) == SPRIG_STATUS_OK &&
              sprig_session_new(q8_model, &q8s) == SPRIG_STATUS_OK,
          "load with an int8 KV cache: %s", sprig_last_error());
    CHECK(sprig_session_generate(q8s, "Once upon a time", &two, NULL, NULL, &res) == SPRIG_STATUS_OK &&
              res.generated_tokens == two.max_tokens,
          "generate with an int8 KV cache");
    CHECK(sprig_session_free(q8s) == SPRIG_STATUS_OK && sprig_model_free(q8_model) == SPRIG_STATUS_OK, "free q8");
    SprigModelOptions huge = opts;
    huge.context_length = 1 << 20;
    SprigModel *none = NULL;
    EXPECT_ERR(sprig_model_load(model_path, &huge, &none), SPRIG_STATUS_INVALID_ARGUMENT);

    /* Chat with a template (synthetic ChatML model); the second turn reuses the first turn's cache. */
    SprigModel *chat_model = NULL;
    CHECK(sprig_model_load(chat_path, NULL, &chat_model) == SPRIG_STATUS_OK, "load chat model");
    SprigSession *chat = NULL;
    CHECK(sprig_session_new(chat_model, &chat) == SPRIG_STATUS_OK, "chat session");
    SprigSamplingParams few_tokens = greedy;
    few_tokens.max_tokens = 5;
    struct buffer reply = {0};
    SprigChatMessage turn1[1] = {{"user", "the cat"}};
    CHECK(sprig_session_chat(chat, turn1, 1, &few_tokens, collect, &reply, &res) == SPRIG_STATUS_OK &&
              res.generated_tokens > 0,
          "chat turn 1");
    uint32_t first_prompt = res.prompt_tokens;
    SprigChatMessage turn2[3] = {{"user", "the cat"}, {"assistant", reply.data ? reply.data : ""}, {"user", "on"}};
    CHECK(sprig_session_chat(chat, turn2, 3, &few_tokens, NULL, NULL, &res) == SPRIG_STATUS_OK, "chat turn 2");
    CHECK(res.prompt_tokens < first_prompt + 12 && res.cached_tokens > 0,
          "turn 2 ran %u prompt tokens, %u cached: the cache was not reused", res.prompt_tokens, res.cached_tokens);
    /* A second session asking the same first turn finds it in the model's prefix cache. */
    SprigSession *other = NULL;
    CHECK(sprig_session_new(chat_model, &other) == SPRIG_STATUS_OK, "second chat session");
    CHECK(sprig_session_chat(other, turn1, 1, &few_tokens, NULL, NULL, &res) == SPRIG_STATUS_OK &&
              res.prefix_cache_tokens > 0 && res.prefix_cache_tokens == res.cached_tokens,
          "prefix cache: %u of %u cached", res.prefix_cache_tokens, res.cached_tokens);
    SprigPrefixCacheStats pcs;
    CHECK(sprig_model_prefix_cache_stats(chat_model, &pcs) == SPRIG_STATUS_OK && pcs.requests == 3 &&
              pcs.shared_tokens == res.prefix_cache_tokens && pcs.blocks > 0 && pcs.bytes > 0 &&
              pcs.budget_bytes == 256u << 20,
          "prefix cache stats: %llu requests, %llu shared, %llu blocks", (unsigned long long)pcs.requests,
          (unsigned long long)pcs.shared_tokens, (unsigned long long)pcs.blocks);
    EXPECT_ERR(sprig_model_prefix_cache_stats(chat_model, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    /* An idle session lets its KV cache go and continues from the prefix cache. */
    uint64_t trimmed_bytes = 0;
    CHECK(sprig_session_trim(other, &trimmed_bytes) == SPRIG_STATUS_OK && trimmed_bytes > 0, "trim: %s",
          sprig_last_error());
    CHECK(sprig_session_chat(other, turn1, 1, &few_tokens, NULL, NULL, &res) == SPRIG_STATUS_OK &&
              res.prefix_cache_tokens > 0,
          "chat after trim: %u from the prefix cache", res.prefix_cache_tokens);
    CHECK(sprig_model_shrink_prefix_cache(chat_model, 0) == SPRIG_STATUS_OK &&
              sprig_model_prefix_cache_stats(chat_model, &pcs) == SPRIG_STATUS_OK && pcs.blocks == 0 &&
              pcs.budget_bytes == 256u << 20,
          "shrink the prefix cache: %llu blocks left", (unsigned long long)pcs.blocks);
    EXPECT_ERR(sprig_session_trim(NULL, NULL), SPRIG_STATUS_INVALID_HANDLE);
    CHECK(sprig_session_free(other) == SPRIG_STATUS_OK, "free second chat session");
    /* The chat model's MTP head drafts; the reply is the one plain decoding gives. */
    {
        SprigSamplingParams twenty = greedy;
        twenty.max_tokens = 20;
        struct buffer plain_out = {.raw = 1}, mtp_out = {.raw = 1};
        SprigSession *plain = NULL, *mtp = NULL;
        CHECK(sprig_session_new(chat_model, &plain) == SPRIG_STATUS_OK &&
                  sprig_session_new(chat_model, &mtp) == SPRIG_STATUS_OK, "MTP sessions");
        CHECK(sprig_session_set_speculation(mtp, SPRIG_SPEC_MTP, NULL, SPRIG_SPEC_MODE_ON, 4) == SPRIG_STATUS_OK,
              "set MTP speculation: %s", sprig_last_error());
        CHECK(sprig_session_generate(plain, "the cat", &twenty, collect, &plain_out, NULL) == SPRIG_STATUS_OK &&
                  sprig_session_generate(mtp, "the cat", &twenty, collect, &mtp_out, NULL) == SPRIG_STATUS_OK,
              "MTP generations");
        CHECK(plain_out.data && mtp_out.data && plain_out.len == mtp_out.len &&
                  memcmp(plain_out.data, mtp_out.data, plain_out.len) == 0,
              "MTP speculation changed the text:\n%s\nvs\n%s", plain_out.data, mtp_out.data);
        SprigSpecStats st;
        CHECK(sprig_session_speculation_stats(mtp, &st) == SPRIG_STATUS_OK && st.passes > 0 && st.drafted > 0,
              "MTP stats: %llu passes, %llu drafted", (unsigned long long)st.passes, (unsigned long long)st.drafted);
        free(plain_out.data);
        free(mtp_out.data);
        CHECK(sprig_session_free(plain) == SPRIG_STATUS_OK && sprig_session_free(mtp) == SPRIG_STATUS_OK,
              "free MTP sessions");
    }
    /* Constrained output and tool calls (this template has no tools section: calls are JSON objects). */
    SprigSession *cs = NULL;
    CHECK(sprig_session_new(chat_model, &cs) == SPRIG_STATUS_OK, "constrained session");
    SprigSamplingParams yes_no = greedy;
    yes_no.max_tokens = 16;
    yes_no.constraint_kind = SPRIG_CONSTRAINT_REGEX;
    yes_no.constraint = "(yes|no)";
    struct buffer yn = {0};
    CHECK(sprig_session_chat(cs, turn1, 1, &yes_no, collect, &yn, &res) == SPRIG_STATUS_OK &&
              res.stop_reason == SPRIG_STOP_TOKEN && yn.data &&
              (strcmp(yn.data, "yes") == 0 || strcmp(yn.data, "no") == 0),
          "regex constraint: '%s' (%s)", yn.data ? yn.data : "", sprig_last_error());
    SprigSamplingParams bad_c = yes_no;
    bad_c.constraint = "(unclosed";
    struct buffer none_out = {0};
    EXPECT_ERR(sprig_session_chat(cs, turn1, 1, &bad_c, collect, &none_out, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    CHECK(none_out.len == 0, "text before a bad constraint's error");
    bad_c.constraint_kind = 99;
    EXPECT_ERR(sprig_session_chat(cs, turn1, 1, &bad_c, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    bad_c.constraint_kind = SPRIG_CONSTRAINT_JSON_SCHEMA;
    bad_c.constraint = NULL;
    EXPECT_ERR(sprig_session_chat(cs, turn1, 1, &bad_c, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    bad_c.constraint = "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"string\"}}, \"required\": [\"a\"]}";
    bad_c.max_tokens = 1;
    CHECK(sprig_session_chat(cs, turn1, 1, &bad_c, NULL, NULL, &res) == SPRIG_STATUS_OK &&
              res.stop_reason == SPRIG_STOP_CONSTRAINT_UNSATISFIED,
          "a budget too small for the schema: stop reason %u", res.stop_reason);
    SprigSamplingParams with_tools = greedy;
    with_tools.max_tokens = 100; /* a byte-level vocabulary: a token per character */
    with_tools.tools_json = "[{\"type\": \"function\", \"function\": {\"name\": \"set_mode\", \"parameters\": "
                            "{\"type\": \"object\", \"properties\": {\"mode\": {\"enum\": [\"eco\", \"sport\"]}}, "
                            "\"required\": [\"mode\"]}}}]";
    with_tools.tool_choice = "set_mode"; /* one call (a random model under "required" may go on calling) */
    CHECK(sprig_session_chat(cs, turn1, 1, &with_tools, NULL, NULL, &res) == SPRIG_STATUS_OK && res.tool_calls == 1 &&
              res.stop_reason == SPRIG_STOP_TOKEN,
          "tool call: %u calls, stop %u (%s)", res.tool_calls, res.stop_reason, sprig_last_error());
    EXPECT_ERR(sprig_session_generate(cs, "the cat", &with_tools, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    size_t calls_len = 0;
    CHECK(sprig_session_tool_calls(cs, NULL, 0, &calls_len) == SPRIG_STATUS_OK && calls_len > 0, "tool calls length");
    char small_buf[4];
    EXPECT_ERR(sprig_session_tool_calls(cs, small_buf, sizeof small_buf, &calls_len), SPRIG_STATUS_INVALID_ARGUMENT);
    char *calls = malloc(calls_len + 1);
    CHECK(calls && sprig_session_tool_calls(cs, calls, calls_len + 1, NULL) == SPRIG_STATUS_OK &&
              strstr(calls, "\"name\":\"set_mode\"") && strstr(calls, "mode\\\":\\\""),
          "tool calls: %s", calls ? calls : "");
    free(calls);
    with_tools.tool_choice = "no_such_tool";
    EXPECT_ERR(sprig_session_chat(cs, turn1, 1, &with_tools, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    with_tools.tool_choice = NULL;
    with_tools.tools_json = "{\"type\": \"function\"}";
    EXPECT_ERR(sprig_session_chat(cs, turn1, 1, &with_tools, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    EXPECT_ERR(sprig_session_tool_calls(NULL, NULL, 0, NULL), SPRIG_STATUS_INVALID_HANDLE);
    CHECK(sprig_session_free(cs) == SPRIG_STATUS_OK, "free constrained session");
    free(yn.data);
    free(none_out.data);

    /* Escalation to a teacher endpoint (the test's stub): streamed through the callback; an offline teacher
       leaves the turn to the local model with the reason kept; bad settings are refused. */
    SprigSession *es = NULL;
    CHECK(sprig_session_new(chat_model, &es) == SPRIG_STATUS_OK, "escalation session");
    SprigEscalation esc = sprig_escalation_default();
    CHECK(esc.url == NULL && esc.policy == SPRIG_ESCALATE_THRESHOLD && esc.window == 16 && esc.timeout_ms == 30000,
          "escalation defaults");
    esc.url = teacher_url;
    esc.policy = SPRIG_ESCALATE_ALWAYS;
    CHECK(sprig_session_set_escalation(es, &esc) == SPRIG_STATUS_OK, "set escalation: %s", sprig_last_error());
    struct buffer taught = {0};
    CHECK(sprig_session_chat(es, turn1, 1, &few_tokens, collect, &taught, &res) == SPRIG_STATUS_OK &&
              res.answered_by == SPRIG_ANSWERED_TEACHER && isnan(res.escalation_signal) && taught.data &&
              strcmp(taught.data, "Hello from the teacher.") == 0,
          "escalated chat: answered by %u, '%s' (%s)", res.answered_by, taught.data ? taught.data : "", sprig_last_error());
    size_t reason_len = 99;
    CHECK(sprig_session_escalation_reason(es, NULL, 0, &reason_len) == SPRIG_STATUS_OK && reason_len == 0,
          "no failure reason after the teacher answered");
    esc.url = "http://127.0.0.1:1"; /* nothing listens there */
    esc.timeout_ms = 2000;
    CHECK(sprig_session_set_escalation(es, &esc) == SPRIG_STATUS_OK, "set offline escalation");
    struct buffer fallback = {0};
    CHECK(sprig_session_chat(es, turn1, 1, &few_tokens, collect, &fallback, &res) == SPRIG_STATUS_OK &&
              res.answered_by == SPRIG_ANSWERED_LOCAL_AFTER_TEACHER_FAILED && fallback.data && fallback.len > 0,
          "offline teacher: answered by %u (%s)", res.answered_by, sprig_last_error());
    char reason[512];
    CHECK(sprig_session_escalation_reason(es, reason, sizeof reason, NULL) == SPRIG_STATUS_OK && strstr(reason, "offline"),
          "failure reason: '%s'", reason);
    SprigEscalation bad_esc = esc;
    bad_esc.policy = 9;
    EXPECT_ERR(sprig_session_set_escalation(es, &bad_esc), SPRIG_STATUS_INVALID_ARGUMENT);
    bad_esc = esc;
    bad_esc.policy = SPRIG_ESCALATE_THRESHOLD;
    bad_esc.threshold = -1.0f;
    EXPECT_ERR(sprig_session_set_escalation(es, &bad_esc), SPRIG_STATUS_INVALID_ARGUMENT);
    bad_esc = esc;
    bad_esc.window = 0;
    EXPECT_ERR(sprig_session_set_escalation(es, &bad_esc), SPRIG_STATUS_INVALID_ARGUMENT);
    bad_esc = esc;
    bad_esc.url = "ftp://teacher";
    EXPECT_ERR(sprig_session_set_escalation(es, &bad_esc), SPRIG_STATUS_INVALID_ARGUMENT);
    EXPECT_ERR(sprig_session_set_escalation(NULL, &esc), SPRIG_STATUS_INVALID_HANDLE);
    CHECK(sprig_session_set_escalation(es, NULL) == SPRIG_STATUS_OK, "escalation off");
    CHECK(sprig_session_chat(es, turn1, 1, &few_tokens, NULL, NULL, &res) == SPRIG_STATUS_OK &&
              res.answered_by == SPRIG_ANSWERED_LOCAL && isnan(res.escalation_signal),
          "no escalation: answered by %u", res.answered_by);
    CHECK(sprig_session_free(es) == SPRIG_STATUS_OK, "free escalation session");
    free(taught.data);
    free(fallback.data);

    SprigChatMessage bad_msg = {"user", NULL};
    EXPECT_ERR(sprig_session_chat(chat, &bad_msg, 1, NULL, NULL, NULL, NULL), SPRIG_STATUS_INVALID_ARGUMENT);

    /* Save and restore: a second session loads the first one's file and continues exactly as it does. */
    char saved[256];
    snprintf(saved, sizeof saved, "/tmp/sprig-c-api-%d.session", (int)getpid());
    CHECK(sprig_session_save(chat, saved) == SPRIG_STATUS_OK, "session save: %s", sprig_last_error());
    SprigSession *restored = NULL;
    CHECK(sprig_session_new(chat_model, &restored) == SPRIG_STATUS_OK, "session for restore");
    CHECK(sprig_session_load(restored, saved) == SPRIG_STATUS_OK, "session load: %s", sprig_last_error());
    struct buffer cont_a = {0}, cont_b = {0};
    CHECK(sprig_session_generate(chat, " and", &short_run, collect, &cont_a, NULL) == SPRIG_STATUS_OK &&
              sprig_session_generate(restored, " and", &short_run, collect, &cont_b, NULL) == SPRIG_STATUS_OK,
          "continue both");
    CHECK(cont_a.data && cont_b.data && strcmp(cont_a.data, cont_b.data) == 0, "restored continues differently");
    EXPECT_ERR(sprig_session_load(restored, "/nonexistent/s.session"), SPRIG_STATUS_LOAD_FAILED);
    EXPECT_ERR(sprig_session_load(restored, model_path), SPRIG_STATUS_LOAD_FAILED); /* not a session file */
    EXPECT_ERR(sprig_session_save(restored, NULL), SPRIG_STATUS_INVALID_ARGUMENT);
    CHECK(sprig_session_free(restored) == SPRIG_STATUS_OK, "free restored");
    remove(saved);

    /* Handles: freed, doubled, made-up. A session outlives its model's handle. */
    CHECK(sprig_model_free(model) == SPRIG_STATUS_OK, "model free");
    EXPECT_ERR(sprig_model_free(model), SPRIG_STATUS_INVALID_HANDLE);
    EXPECT_ERR(sprig_session_new(model, &session), SPRIG_STATUS_INVALID_HANDLE);
    CHECK(sprig_session_reset(session) == SPRIG_STATUS_OK &&
              sprig_session_generate(session, "Once", &short_run, NULL, NULL, &res) == SPRIG_STATUS_OK,
          "a session keeps its model's weights alive");
    CHECK(sprig_session_free(session) == SPRIG_STATUS_OK, "session free");
    EXPECT_ERR(sprig_session_free(session), SPRIG_STATUS_INVALID_HANDLE);
    EXPECT_ERR(sprig_session_generate(session, "x", NULL, NULL, NULL, NULL), SPRIG_STATUS_INVALID_HANDLE);
    EXPECT_ERR(sprig_session_cancel(session), SPRIG_STATUS_INVALID_HANDLE);
    EXPECT_ERR(sprig_session_free(NULL), SPRIG_STATUS_INVALID_HANDLE);
    EXPECT_ERR(sprig_model_free((SprigModel *)(uintptr_t)0xdead), SPRIG_STATUS_INVALID_HANDLE);
    EXPECT_ERR(sprig_session_reset((SprigSession *)(uintptr_t)12345), SPRIG_STATUS_INVALID_HANDLE);
    CHECK(sprig_session_free(s16) == SPRIG_STATUS_OK && sprig_model_free(small) == SPRIG_STATUS_OK, "free ctx 16");
    CHECK(sprig_session_free(chat) == SPRIG_STATUS_OK && sprig_model_free(chat_model) == SPRIG_STATUS_OK,
          "free chat");

    free(out.data);
    free(few.data);
    free(cc.buf.data);
    free(reply.data);
    free(golden);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C API checks passed\n");
    return 0;
}
