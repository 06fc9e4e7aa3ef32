// The JNI-facing binding of sprig: handles, native calls, callbacks, errors, AutoCloseable. Plain Kotlin with
// no dependency beyond the standard library (nothing from android.jar), so the whole source set compiles with
// the Kotlin compiler on the host and is tested for real on the host JVM against the host-built libsprig
// (crates/sprig-ffi/tests/jvm.rs). The coroutine/Flow surface is a thin adapter over it in SprigFlow.kt.
package dev.sprig

/** What went wrong, as the C API's `SprigStatus` (the native side names it; no numbers are re-typed here). */
enum class SprigStatus { OK, INVALID_ARGUMENT, INVALID_HANDLE, LOAD_FAILED, CONTEXT_FULL, BUSY, DEVICE, INTERNAL, OUT_OF_MEMORY }

/**
 * A failure inside sprig: [status] (by name from the native side), [code] the C API's number for it,
 * [message] the native message.
 */
class SprigException(val code: Int, statusName: String, message: String) : RuntimeException(message) {
    val status: SprigStatus = SprigStatus.valueOf(statusName)
}

/** Where a model runs; passed to and from the native side by name. */
enum class Device { CPU, GPU, AUTO }

/**
 * What a session does when a request would overflow its context: [TRUNCATE_MIDDLE] keeps the system prompt,
 * drops the oldest turns and runs the kept tail again (exact); [SHIFT] rotates the kept keys instead (cheap,
 * approximate: llama.cpp's context shift); [ERROR] refuses (CONTEXT_FULL) or stops generating.
 */
enum class ContextPolicy { TRUNCATE_MIDDLE, SHIFT, ERROR }

/** How sessions store their KV cache: [F32], or [Q8] (int8 with a scale per position and KV head). */
enum class KvType { F32, Q8 }

/**
 * Options of [SprigModel.load]. `threads = 0`: one per core; `contextLength = 0`: the model's own;
 * `memoryBudgetMb`: what the model and its sessions may use (weights + KV caches + prefix cache + scratch),
 * checked before loading with one session (OUT_OF_MEMORY instead of the low-memory killer) and kept as sessions
 * are made and run: the prefix cache, then the longest-idle sessions (trimmed: their conversation stays) give
 * way first; 0 = no budget (the available memory is checked).
 * `prefixCacheMb`: K/V of prompt blocks shared by the model's sessions (0 = off; shrunk to what the budget
 * leaves); `contextPolicy`: see [ContextPolicy]; `kvType`: see [KvType].
 */
data class ModelOptions(
    val tokenizerPath: String? = null,
    val threads: Int = 0,
    val device: Device = Device.CPU,
    val contextLength: Int = 0,
    val memoryBudgetMb: Int = 0,
    val prefixCacheMb: Int = 256,
    val contextPolicy: ContextPolicy = ContextPolicy.TRUNCATE_MIDDLE,
    val kvType: KvType = KvType.F32
)

/** What a model's prefix cache holds and saved over its sessions' requests. */
data class PrefixCacheStats(
    val requests: Long,
    val promptTokens: Long,
    val cachedTokens: Long,
    val sharedTokens: Long,
    val blocks: Long,
    val bytes: Long,
    val budgetBytes: Long,
    val evictedBlocks: Long
) {
    /** Prompt tokens not run / prompt tokens. */
    val hitRate: Double get() = if (promptTokens == 0L) 0.0 else cachedTokens.toDouble() / promptTokens
}

/**
 * Sampling, as a chain: [logitBias] → repetition/presence/frequency penalties over the last [penaltyLastN]
 * tokens → [temperature] (0 = greedy) → [topK] → [typicalP] → [topP] → [minP]. Generation stops at any of
 * [stop] (found across token boundaries, not returned). The session's random stream starts from [seed] and
 * carries on over its requests until another seed is given. The defaults are the engine's, read by name
 * through JNI (the same as the C API's and the CLI's). [parseSpecial] (raw prompts of `generate` only):
 * special-token strings in the prompt become control tokens; by default the prompt is plain text. Chat message
 * content is always plain text.
 *
 * Constrained output (at most one): [jsonSchema] (the output is an instance of this JSON Schema, its JSON text),
 * [regex] (the whole output matches), [grammar] (a Lark grammar, llguidance's dialect), [jsonObject] (any JSON
 * object). An invalid or unsupported one throws [SprigException] (INVALID_ARGUMENT) before any token is
 * generated; output that ran out of tokens before it matched ends with [StopReason.CONSTRAINT_UNSATISFIED].
 *
 * Tools (chat only): [tools] is a JSON array in OpenAI's `tools` shape; [toolChoice] is "auto", "none",
 * "required" or a tool's name; with [constrainTools] the calls' arguments are held to each tool's schema. The
 * reply's calls come back in [GenerationResult.toolCalls]; answer them with `tool` messages.
 */
data class SamplingParams(
    val temperature: Float = EngineDefaults.float("temperature"),
    val topK: Int = EngineDefaults.int("topK"),
    val topP: Float = EngineDefaults.float("topP"),
    val minP: Float = EngineDefaults.float("minP"),
    val typicalP: Float = EngineDefaults.float("typicalP"),
    val repeatPenalty: Float = EngineDefaults.float("repeatPenalty"),
    val presencePenalty: Float = EngineDefaults.float("presencePenalty"),
    val frequencyPenalty: Float = EngineDefaults.float("frequencyPenalty"),
    val penaltyLastN: Int = EngineDefaults.int("penaltyLastN"),
    /** Token id → added to its logit (`Float.NEGATIVE_INFINITY` bans it). */
    val logitBias: Map<Int, Float> = emptyMap(),
    val stop: List<String> = emptyList(),
    val seed: Long = EngineDefaults.int("seed").toLong(),
    val maxTokens: Int = EngineDefaults.int("maxTokens"),
    val parseSpecial: Boolean = false,
    val jsonSchema: String? = null,
    val regex: String? = null,
    val grammar: String? = null,
    val jsonObject: Boolean = false,
    val tools: String? = null,
    val toolChoice: String = "auto",
    val constrainTools: Boolean = true
)

/** The parameters of one generation: sampling, length, constraint and tools. */
typealias GenerateParams = SamplingParams

/** A tool call the model made: [arguments] is a JSON object's text. */
data class ToolCall(val id: String, val name: String, val arguments: String)

/** The engine's sampling defaults, asked for by name once each. */
internal object EngineDefaults {
    private val asked = java.util.concurrent.ConcurrentHashMap<String, Double>()
    private fun get(name: String): Double = asked.getOrPut(name) { Native.samplingDefault(name) }
    fun float(name: String): Float = get(name).toFloat()
    fun int(name: String): Int = get(name).toInt()
}

/**
 * One turn: [role] is system, user, assistant or tool. An assistant turn may carry the [toolCalls] it made; a
 * `tool` turn is a tool's result, [name] the tool's name.
 */
data class ChatMessage(
    val role: String,
    val content: String,
    val toolCalls: List<ToolCall> = emptyList(),
    val name: String? = null
)

/** Why a generation ended; the native side returns it by name. */
enum class StopReason { STOP_TOKEN, LENGTH, CANCELLED, CONTEXT_FULL, STOP_STRING, CONSTRAINT_UNSATISFIED }

/**
 * What a generation did: [promptTokens] ran, [cachedTokens] more were reused (from the session's cache or,
 * [prefixCacheTokens] of them, from the prefix cache the model's sessions share); [contextDroppedTokens] were
 * dropped by the context policy; [batchedSteps] decode steps ran in one batch with other sessions of the model
 * generating at the same time (sessions generating concurrently, from several threads or coroutines, batch
 * without asking).
 */
data class GenerationResult(
    val stopReason: StopReason,
    val promptTokens: Int,
    val generatedTokens: Int,
    val cachedTokens: Int,
    val prefixCacheTokens: Int,
    val contextDroppedTokens: Int,
    /** The reply's tool calls (a chat with [SamplingParams.tools]); empty for a text reply. */
    val toolCalls: List<ToolCall> = emptyList(),
    val batchedSteps: Int = 0,
    /** Who answered a chat under [SprigSession.setEscalation] (always [AnsweredBy.LOCAL] without). */
    val answeredBy: AnsweredBy = AnsweredBy.LOCAL,
    /** Escalation's signal: the local model's mean entropy over its first reply tokens (nats); null when it did
     *  not run first or the session does not escalate. */
    val escalationSignal: Float? = null,
    /** Why an escalated turn's teacher did not answer (offline, timed out, an HTTP status, a malformed reply). */
    val escalationFailure: String? = null
) {
    /** Built natively: the tool calls as parallel arrays, the escalation by name (NaN / "" for none). */
    internal constructor(
        stopReason: StopReason, promptTokens: Int, generatedTokens: Int, cachedTokens: Int, prefixCacheTokens: Int,
        contextDroppedTokens: Int, callIds: Array<String>, callNames: Array<String>, callArguments: Array<String>,
        batchedSteps: Int, answeredBy: String, escalationSignal: Float, escalationFailure: String
    ) : this(
        stopReason, promptTokens, generatedTokens, cachedTokens, prefixCacheTokens, contextDroppedTokens,
        callIds.indices.map { ToolCall(callIds[it], callNames[it], callArguments[it]) }, batchedSteps,
        AnsweredBy.valueOf(answeredBy), escalationSignal.takeUnless { it.isNaN() }, escalationFailure.ifEmpty { null }
    )
}

/** Who answered a chat turn under escalation. */
enum class AnsweredBy { LOCAL, TEACHER, LOCAL_AFTER_TEACHER_FAILED }

/** When a turn goes to the teacher: [THRESHOLD] when the local model's mean entropy over its first reply tokens
 *  exceeds [Escalation.threshold]. */
enum class EscalationPolicy { NEVER, THRESHOLD, ALWAYS }

/**
 * Where a session's chats escalate: a teacher behind an OpenAI-compatible endpoint ([url] `http://host:port`),
 * answering through `/v1/chat/completions`, streamed through the same callback. Offline, slower than
 * [timeoutMs], failing or malformed: the local model answers and [GenerationResult.escalationFailure] says why.
 */
data class Escalation(
    val url: String,
    val model: String = "teacher",
    val apiKey: String? = null,
    val policy: EscalationPolicy = EscalationPolicy.THRESHOLD,
    val threshold: Float = 1.0f,
    val window: Int = 16,
    val timeoutMs: Int = 30_000
)

/** Receives generated text piece by piece; return false to stop. Called on the generating thread. */
interface TokenCallback {
    fun onToken(text: String): Boolean
}

/** The native methods (crates/sprig-ffi/src/jni.rs). Handles are registry ids: a stale one is an error. */
internal object Native {
    init {
        System.loadLibrary("sprig")
    }

    @JvmStatic external fun version(): String
    @JvmStatic external fun samplingDefault(name: String): Double
    @JvmStatic external fun modelLoad(
        path: String, tokenizer: String?, threads: Int, device: String, contextLength: Int, memoryBudgetMb: Int,
        prefixCacheMb: Int, contextPolicy: String, kvType: String
    ): Long
    @JvmStatic external fun modelFree(model: Long)
    @JvmStatic external fun modelContextLength(model: Long): Int
    @JvmStatic external fun modelDevice(model: Long): String
    @JvmStatic external fun modelPrefixCacheStats(model: Long): LongArray
    @JvmStatic external fun modelShrinkPrefixCache(model: Long, bytes: Long)
    @JvmStatic external fun sessionTrim(session: Long): Long
    /** `drafter`: 0 off, 1 prompt lookup, 2 draft model, 3 MTP head (the C ABI's SPRIG_SPEC_* values). */
    @JvmStatic external fun sessionSetSpeculation(session: Long, drafter: Int, draftModel: Long, mode: String, maxDraft: Int)
    @JvmStatic external fun sessionSpeculationStats(session: Long): LongArray
    @JvmStatic external fun sessionSetEscalation(
        session: Long, url: String?, model: String, apiKey: String?, policy: String, threshold: Float, window: Int,
        timeoutMs: Int
    )
    @JvmStatic external fun sessionNew(model: Long): Long
    @JvmStatic external fun sessionFree(session: Long)
    @JvmStatic external fun sessionReset(session: Long)
    @JvmStatic external fun sessionCancel(session: Long)
    @JvmStatic external fun sessionSave(session: Long, path: String)
    @JvmStatic external fun sessionLoad(session: Long, path: String)
    /** [params]'s scalar fields are read by name natively; its bias map and stop list come as arrays. */
    @JvmStatic external fun sessionGenerate(
        session: Long, prompt: String, params: SamplingParams, biasTokens: IntArray, biasValues: FloatArray,
        stop: Array<String>, callback: TokenCallback
    ): GenerationResult
    /** Messages as parallel arrays; their tool calls flattened, [callMessage] the index of each one's message. */
    @JvmStatic external fun sessionChat(
        session: Long, roles: Array<String>, contents: Array<String>, names: Array<String?>, callMessage: IntArray,
        callIds: Array<String>, callNames: Array<String>, callArguments: Array<String>, params: SamplingParams,
        biasTokens: IntArray, biasValues: FloatArray, stop: Array<String>, callback: TokenCallback
    ): GenerationResult
}

/** When speculative decoding runs: [AUTO] while it is faster than plain decoding (measured), [ON] always. */
enum class SpecMode { AUTO, ON }

/**
 * Speculative decoding: a drafter proposes tokens that the model checks in one pass. [draftModel] `null` drafts
 * by prompt lookup (what followed the latest earlier occurrence of the last few tokens); otherwise a smaller
 * loaded model of the same tokenizer drafts. [mtp] drafts with the model's own multi-token-prediction head
 * instead (a file with GGUF `nextn` layers; [draftModel] must be `null`). [maxDraft] (1..32): most tokens
 * drafted per pass.
 */
data class Speculation(
    val draftModel: SprigModel? = null,
    val mode: SpecMode = SpecMode.AUTO,
    val maxDraft: Int = 8,
    val mtp: Boolean = false,
) {
    init {
        require(!(mtp && draftModel != null)) { "an MTP head or a draft model, not both" }
    }
}

/** What a session's speculative decoding did: drafted and accepted tokens, verification passes, the tokens they
 *  produced, and whether [SpecMode.AUTO] switched it off. */
data class SpeculationStats(val drafted: Long, val accepted: Long, val passes: Long, val passTokens: Long, val switchedOff: Boolean) {
    val acceptance: Double get() = if (drafted == 0L) 0.0 else accepted.toDouble() / drafted
}

/**
 * A loaded model. Thread-safe; share it between sessions. [close] releases it (sessions still open keep the
 * weights alive until they are closed); closing twice does nothing; any other use after close throws
 * [SprigException] with status INVALID_HANDLE.
 */
class SprigModel private constructor(internal val handle: Long) : AutoCloseable {
    @Volatile private var closed = false

    companion object {
        @JvmStatic
        fun load(path: String, options: ModelOptions = ModelOptions()): SprigModel = SprigModel(
            Native.modelLoad(
                path, options.tokenizerPath, options.threads, options.device.name, options.contextLength,
                options.memoryBudgetMb, options.prefixCacheMb, options.contextPolicy.name, options.kvType.name
            )
        )

        @JvmStatic
        val version: String
            get() = Native.version()
    }

    /** Tokens a session of this model holds. */
    val contextLength: Int
        get() = Native.modelContextLength(handle)

    /** Where the model runs: [Device.CPU] or [Device.GPU] (what [Device.AUTO] chose). */
    val device: Device
        get() = Device.valueOf(Native.modelDevice(handle))

    /** What the prefix cache shared by this model's sessions holds and saved. */
    val prefixCacheStats: PrefixCacheStats
        get() = Native.modelPrefixCacheStats(handle).let {
            PrefixCacheStats(it[0], it[1], it[2], it[3], it[4], it[5], it[6], it[7])
        }

    /** Evicts the prefix cache down to [bytes] (its budget stays): the first thing to give back on
     *  `onTrimMemory`. */
    fun shrinkPrefixCache(bytes: Long) = Native.modelShrinkPrefixCache(handle, bytes)

    /** A new, empty conversation on this model. */
    fun newSession(): SprigSession = SprigSession(Native.sessionNew(handle))

    @Synchronized
    override fun close() {
        if (!closed) {
            closed = true
            Native.modelFree(handle)
        }
    }
}

/**
 * A conversation (its own KV cache). One generation at a time: a concurrent call throws [SprigException] with
 * status BUSY. [cancel] may be called from any thread. [close] while generating cancels the generation.
 */
class SprigSession internal constructor(private val handle: Long) : AutoCloseable {
    @Volatile private var closed = false

    /** Continues the context with [prompt] and streams generated text to [onToken] (blocking). */
    fun generateStreaming(prompt: String, params: SamplingParams, onToken: TokenCallback): GenerationResult {
        val bias = params.logitBias.entries.toList()
        return Native.sessionGenerate(
            handle, prompt, params, bias.map { it.key }.toIntArray(), bias.map { it.value }.toFloatArray(),
            params.stop.toTypedArray(), onToken
        )
    }

    /** Answers the last turn of [messages] with the model's chat template, streaming to [onToken] (blocking).
     *  Earlier turns already in the cache are not run again. */
    fun chatStreaming(messages: List<ChatMessage>, params: SamplingParams, onToken: TokenCallback): GenerationResult {
        val bias = params.logitBias.entries.toList()
        val calls = messages.withIndex().flatMap { (i, m) -> m.toolCalls.map { i to it } }
        return Native.sessionChat(
            handle, messages.map { it.role }.toTypedArray(), messages.map { it.content }.toTypedArray(),
            messages.map { it.name }.toTypedArray(), calls.map { it.first }.toIntArray(),
            calls.map { it.second.id }.toTypedArray(), calls.map { it.second.name }.toTypedArray(),
            calls.map { it.second.arguments }.toTypedArray(), params,
            bias.map { it.key }.toIntArray(), bias.map { it.value }.toFloatArray(), params.stop.toTypedArray(), onToken
        )
    }

    /** Stops the running generation before its next token (it returns with [StopReason.CANCELLED]). */
    fun cancel() = Native.sessionCancel(handle)

    /**
     * Lets the KV cache go while keeping the conversation (an idle session on `onTrimMemory`): its blocks go
     * into the model's prefix cache first, so the next call restores them from there. Returns the bytes held.
     */
    fun trim(): Long = Native.sessionTrim(handle)

    /**
     * Speculative decoding for this session's generations from the next one on (`null`: off). Exact: greedy
     * output is unchanged, sampled output keeps its distribution; constrained generations do not speculate.
     */
    fun setSpeculation(speculation: Speculation?) {
        val s = speculation
        val drafter = when {
            s == null -> 0
            s.mtp -> 3
            s.draftModel != null -> 2
            else -> 1
        }
        Native.sessionSetSpeculation(handle, drafter, s?.draftModel?.handle ?: 0L, (s?.mode ?: SpecMode.AUTO).name, s?.maxDraft ?: 8)
    }

    /**
     * Hands the chat turns the local model is unsure of to a teacher from the next chat on (`null`: off). Raw
     * generations, chats with tools and constrained chats are not escalated. A bad URL or setting throws
     * [SprigException] (INVALID_ARGUMENT).
     */
    fun setEscalation(escalation: Escalation?) {
        val e = escalation
        Native.sessionSetEscalation(
            handle, e?.url, e?.model ?: "teacher", e?.apiKey, (e?.policy ?: EscalationPolicy.THRESHOLD).name,
            e?.threshold ?: 1.0f, e?.window ?: 16, e?.timeoutMs ?: 30_000
        )
    }

    /** What speculative decoding did on this session so far (zeros when it does not speculate). */
    val speculationStats: SpeculationStats
        get() = Native.sessionSpeculationStats(handle).let { SpeculationStats(it[0], it[1], it[2], it[3], it[4] != 0L) }

    /** Forgets the conversation. */
    fun reset() = Native.sessionReset(handle)

    /** Saves the conversation (KV cache, tokens, random stream) to [path], replacing the file atomically. */
    fun save(path: String) = Native.sessionSave(handle, path)

    /**
     * Replaces the conversation with the one saved at [path]: the next call continues it without running it
     * again. A file of another model, a truncated or damaged one throws [SprigException] (LOAD_FAILED) and
     * leaves the session empty.
     */
    fun load(path: String) = Native.sessionLoad(handle, path)

    @Synchronized
    override fun close() {
        if (!closed) {
            closed = true
            Native.sessionFree(handle)
        }
    }
}
