// Host-JVM test of the JNI binding (run by crates/sprig-ffi/tests/jvm.rs against the host-built libsprig):
// golden text, streaming, cancellation mid-stream, misuse, chat, the Flow API (FlowTest.kt), and resident memory
// across load/unload cycles (sized to see a 10 KiB-per-cycle leak).
// Usage: HostTestKt STORIES260K.bin TOK512.bin GOLDEN.txt CHAT_MODEL.gguf
package dev.sprig

import java.io.File
import kotlin.concurrent.thread

private var failures = 0

internal fun check(ok: Boolean, what: () -> String) {
    if (!ok) {
        failures++
        System.err.println("FAIL: " + what())
    }
}

/** Runs [block], expecting a SprigException with [code] and a non-empty message. */
internal fun expectError(code: SprigStatus, what: String, block: () -> Unit) {
    try {
        block()
        check(false) { "$what: no exception" }
    } catch (e: SprigException) {
        check(e.status == code && !e.message.isNullOrEmpty()) { "$what: ${e.status} (${e.code}: ${e.message}), expected $code" }
    }
}

private fun rssKb(): Long =
    File("/proc/self/status").readLines().first { it.startsWith("VmRSS:") }.split(Regex("\\s+"))[1].toLong()

internal class Collect(val stopAfter: Int = 0, val onPiece: (Int) -> Unit = {}) : TokenCallback {
    val text = StringBuilder()
    var pieces = 0
    override fun onToken(text: String): Boolean {
        this.text.append(text)
        pieces++
        onPiece(pieces)
        return stopAfter == 0 || pieces < stopAfter
    }
}

/** Leak threshold per cycle: half the 10 KiB leak the test must see. */
private const val LEAK_LIMIT_KB = 5.0

/** Resident growth per run of [cycle], in KiB: measured between 300 and 1300 runs (after 300 to warm up). */
private fun leakPerCycle(cycle: () -> Unit): Double {
    repeat(300) { cycle() }
    System.gc()
    val before = rssKb()
    repeat(1000) { cycle() }
    System.gc()
    return (rssKb() - before) / 1000.0
}

fun main(args: Array<String>) {
    val (modelPath, tokPath, goldenPath, chatPath) = args
    val teacherUrl = args[4]
    val golden = File(goldenPath).readText().trimEnd('\n')
    check(SprigModel.version.isNotEmpty()) { "empty version" }
    val opts = ModelOptions(tokenizerPath = tokPath, threads = 1)
    val greedy = SamplingParams(temperature = 0f, maxTokens = 252)
    // The defaults come from the engine (through JNI): greedy, 256 tokens, as the C API's.
    val defaults = SamplingParams()
    check(defaults.temperature == 0f && defaults.maxTokens == 256 && defaults.topK == 40) { "defaults $defaults" }

    expectError(SprigStatus.LOAD_FAILED, "missing file") { SprigModel.load("/nonexistent/m.gguf") }
    expectError(SprigStatus.LOAD_FAILED, "llama2.c without tokenizer") { SprigModel.load(modelPath) }
    expectError(SprigStatus.DEVICE, "GPU in a CPU build") { SprigModel.load(modelPath, opts.copy(device = Device.GPU)) }
    expectError(SprigStatus.INVALID_ARGUMENT, "negative threads") { SprigModel.load(modelPath, opts.copy(threads = -1)) }
    expectError(SprigStatus.OUT_OF_MEMORY, "a 1 MiB budget") { SprigModel.load(modelPath, opts.copy(memoryBudgetMb = 1)) }

    SprigModel.load(modelPath, opts).use { model ->
        check(model.contextLength == 512) { "context ${model.contextLength}" }
        check(model.device == Device.CPU) { "device ${model.device}" }
        val session = model.newSession()

        // Golden text, streamed in pieces.
        val c = Collect()
        val r = session.generateStreaming("Once upon a time", greedy, c)
        check("Once upon a time" + c.text == golden) { "golden text differs:\n${c.text}" }
        check(r.stopReason == StopReason.LENGTH && r.generatedTokens == 252 && r.promptTokens == 5) { "$r" }
        check(c.pieces > 100) { "only ${c.pieces} pieces: not streamed" }

        // Speculative decoding keeps the golden text: prompt lookup, and the model drafting for itself (every
        // draft accepted).
        for (spec in listOf(Speculation(mode = SpecMode.ON), Speculation(draftModel = model, mode = SpecMode.ON, maxDraft = 5))) {
            model.newSession().use { s ->
                s.setSpeculation(spec)
                val sc = Collect()
                s.generateStreaming("Once upon a time", greedy, sc)
                check("Once upon a time" + sc.text == golden) { "speculative ($spec) golden text differs:\n${sc.text}" }
                val st = s.speculationStats
                check(st.passes > 0 && (spec.draftModel == null || st.accepted == st.drafted)) { "$spec: $st" }
                s.setSpeculation(null)
                expectError(SprigStatus.INVALID_ARGUMENT, "max draft 0") { s.setSpeculation(Speculation(maxDraft = 0)) }
                expectError(SprigStatus.INVALID_ARGUMENT, "no MTP head") { s.setSpeculation(Speculation(mtp = true)) }
            }
        }

        // A stop string that spans pieces: the text up to it, then STOP_STRING; the same through a penalty and
        // a bias that changes nothing greedy picks (a bias on a token of the vocabulary's tail).
        val tail = golden.removePrefix("Once upon a time")
        val stopAt = tail.substring(40, 47)
        session.reset()
        val cs = Collect()
        val params = greedy.copy(stop = listOf(stopAt), logitBias = mapOf(511 to -1f), penaltyLastN = 0)
        val rs = session.generateStreaming("Once upon a time", params, cs)
        check(rs.stopReason == StopReason.STOP_STRING && cs.text.toString() == tail.substring(0, tail.indexOf(stopAt))) {
            "stop string `$stopAt`: $rs, `${cs.text}`"
        }
        expectError(SprigStatus.INVALID_ARGUMENT, "min-p 1") {
            session.generateStreaming("x", greedy.copy(minP = 1f), Collect())
        }

        // Save and restore: another session continues exactly as this one does; a bad file → LOAD_FAILED.
        val saved = File.createTempFile("sprig", ".session")
        session.save(saved.path)
        model.newSession().use { other ->
            other.load(saved.path)
            val (a, b) = Collect() to Collect()
            session.generateStreaming(" and", greedy.copy(maxTokens = 6), a)
            other.generateStreaming(" and", greedy.copy(maxTokens = 6), b)
            check(a.text.toString() == b.text.toString()) { "restored: `${b.text}` vs `${a.text}`" }
            expectError(SprigStatus.LOAD_FAILED, "not a session file") { other.load(modelPath) }
        }
        saved.delete()

        // The callback stops generation.
        session.reset()
        val few = Collect(stopAfter = 3)
        check(session.generateStreaming("Once upon a time", greedy, few).stopReason == StopReason.CANCELLED) { "stop" }
        check(few.pieces == 3 && golden.startsWith("Once upon a time" + few.text)) { "stopped text ${few.text}" }

        // Cancel from another thread mid-stream.
        session.reset()
        var canceller: Thread? = null
        val slow = Collect { n ->
            if (n == 5) canceller = thread { session.cancel() }
            Thread.sleep(2)
        }
        val rc = session.generateStreaming("Once upon a time", greedy, slow)
        canceller?.join()
        check(rc.stopReason == StopReason.CANCELLED && slow.pieces in 5..251) { "cancel: $rc after ${slow.pieces}" }

        // Two sessions generating at the same time (the second starts when the first's text flows) decode as
        // one batch, each with its own golden text.
        var batched = 0
        for (attempt in 1..10) {
            val texts = arrayOfNulls<String>(2)
            val results = arrayOfNulls<GenerationResult>(2)
            val flowing = java.util.concurrent.CountDownLatch(1)
            val threads = (0..1).map { i ->
                thread {
                    model.newSession().use { s ->
                        if (i == 1) flowing.await()
                        val col = Collect { n -> if (i == 0 && n == 1) flowing.countDown() }
                        results[i] = s.generateStreaming("Once upon a time", greedy, col)
                        texts[i] = col.text.toString()
                    }
                }
            }
            threads.forEach { it.join() }
            for (i in 0..1) check("Once upon a time" + texts[i] == golden) { "concurrent session $i:\n${texts[i]}" }
            batched = results.sumOf { it!!.batchedSteps }
            if (batched > 0) break
        }
        check(batched > 0) { "two sessions generating at once never shared a step" }

        // A concurrent generate on the same session is refused with BUSY.
        session.reset()
        var busyChecked = false
        val busy = Collect { n ->
            if (n == 1) {
                thread {
                    expectError(SprigStatus.BUSY, "concurrent generate") {
                        session.generateStreaming("x", greedy, Collect())
                    }
                    busyChecked = true
                }.join()
            }
        }
        session.generateStreaming("Once", greedy.copy(maxTokens = 4), busy)
        check(busyChecked) { "busy check did not run" }

        // An exception thrown by the callback reaches the caller and stops generation.
        session.reset()
        try {
            session.generateStreaming("Once", greedy, Collect { throw IllegalStateException("from callback") })
            check(false) { "callback exception swallowed" }
        } catch (e: IllegalStateException) {
            check(e.message == "from callback") { "wrong exception ${e.message}" }
        }

        // Bad parameters; context overflow.
        expectError(SprigStatus.INVALID_ARGUMENT, "temperature -1") {
            session.generateStreaming("x", greedy.copy(temperature = -1f), Collect())
        }
        expectError(SprigStatus.INVALID_ARGUMENT, "top-p 2") {
            session.generateStreaming("x", greedy.copy(topP = 2f), Collect())
        }
        expectError(SprigStatus.INVALID_ARGUMENT, "chat without a template") {
            session.chatStreaming(listOf(ChatMessage("user", "hi")), greedy, Collect())
        }
        // An int8 KV cache runs too.
        SprigModel.load(modelPath, opts.copy(kvType = KvType.Q8)).use { q8 ->
            q8.newSession().use { s ->
                val r = s.generateStreaming("Once upon a time", greedy.copy(maxTokens = 8), Collect())
                check(r.generatedTokens == 8) { "int8 KV: $r" }
            }
        }
        // By default a full context drops old tokens and goes on; the error policy stops or refuses instead.
        SprigModel.load(modelPath, opts.copy(contextLength = 16)).use { small ->
            small.newSession().use { s ->
                val r = s.generateStreaming("Once upon a time", greedy, Collect())
                check(r.stopReason != StopReason.CONTEXT_FULL && r.generatedTokens > 16 && r.contextDroppedTokens > 0) {
                    "past the context: $r"
                }
            }
        }
        SprigModel.load(modelPath, opts.copy(contextLength = 16, contextPolicy = ContextPolicy.ERROR)).use { small ->
            small.newSession().use { s ->
                check(s.generateStreaming("Once upon a time", greedy, Collect()).stopReason == StopReason.CONTEXT_FULL) {
                    "context full"
                }
                s.reset()
                expectError(SprigStatus.CONTEXT_FULL, "prompt longer than the context") {
                    s.generateStreaming("Once upon a time there was a girl named Lily who liked to play", greedy, Collect())
                }
            }
        }
        // A lone surrogate is not valid text: an error or a result, never a crash.
        try {
            session.reset()
            session.generateStreaming("\uD800", greedy.copy(maxTokens = 2), Collect())
        } catch (e: SprigException) {
            check(e.status == SprigStatus.INVALID_ARGUMENT) { "surrogate: ${e.code}" }
        }

        // Misuse: closed handles, double close, made-up handles.
        session.close()
        session.close()
        expectError(SprigStatus.INVALID_HANDLE, "generate on a closed session") {
            session.generateStreaming("x", greedy, Collect())
        }
        expectError(SprigStatus.INVALID_HANDLE, "cancel on a closed session") { session.cancel() }
        expectError(SprigStatus.INVALID_HANDLE, "made-up session") { Native.sessionFree(987654321L) }
        expectError(SprigStatus.INVALID_HANDLE, "made-up model") { Native.modelFree(0L) }
        val orphan = model.newSession()
        model.close()
        model.close()
        expectError(SprigStatus.INVALID_HANDLE, "session on a closed model") { model.newSession() }
        check(orphan.generateStreaming("Once", greedy.copy(maxTokens = 3), Collect()).generatedTokens == 3) {
            "a session keeps its model alive"
        }
        orphan.close()
    }

    // Chat: the template is applied and the second turn reuses the cached first turn.
    SprigModel.load(chatPath).use { model ->
        model.newSession().use { s ->
            val p = SamplingParams(temperature = 0f, maxTokens = 5)
            val reply = Collect()
            val r1 = s.chatStreaming(listOf(ChatMessage("user", "the cat")), p, reply)
            check(r1.generatedTokens > 0) { "chat produced nothing" }
            val turns = listOf(ChatMessage("user", "the cat"), ChatMessage("assistant", reply.text.toString()),
                ChatMessage("user", "on"))
            val r2 = s.chatStreaming(turns, p, Collect())
            check(r2.promptTokens < r1.promptTokens + 12 && r2.cachedTokens > 0) { "turn 2: $r2" }
            // Another session asking the same first turn finds it in the model's prefix cache.
            model.newSession().use { other ->
                val r3 = other.chatStreaming(listOf(ChatMessage("user", "the cat")), p, Collect())
                check(r3.prefixCacheTokens > 0 && r3.prefixCacheTokens == r3.cachedTokens) { "prefix cache: $r3" }
                val st = model.prefixCacheStats
                check(st.requests == 3L && st.sharedTokens == r3.prefixCacheTokens.toLong() && st.blocks > 0 &&
                    st.hitRate > 0.0) { "prefix cache stats: $st" }
                check(other.trim() > 0L) { "trim freed nothing" }
                val r4 = other.chatStreaming(listOf(ChatMessage("user", "the cat")), p, Collect())
                check(r4.prefixCacheTokens > 0) { "after trim: $r4" }
                model.shrinkPrefixCache(0L)
                check(model.prefixCacheStats.blocks == 0L) { "shrink: ${model.prefixCacheStats}" }
            }
        }
        // The chat model's MTP head drafts; the text is plain decoding's.
        val twenty = SamplingParams(temperature = 0f, maxTokens = 20)
        val plainText = model.newSession().use { s -> Collect().also { s.generateStreaming("the cat", twenty, it) }.text.toString() }
        model.newSession().use { s ->
            s.setSpeculation(Speculation(mtp = true, mode = SpecMode.ON, maxDraft = 4))
            val c = Collect()
            s.generateStreaming("the cat", twenty, c)
            check(c.text.toString() == plainText) { "MTP speculation changed the text:\n${c.text}\nvs\n$plainText" }
            val st = s.speculationStats
            check(st.passes > 0 && st.drafted > 0) { "MTP: $st" }
        }
        // Escalation: the teacher (the test's stub endpoint) answers through the same callback; an offline one
        // leaves the turn to the local model with the reason; bad settings throw.
        model.newSession().use { s ->
            val p = SamplingParams(temperature = 0f, maxTokens = 5)
            s.setEscalation(Escalation(teacherUrl, policy = EscalationPolicy.ALWAYS))
            val taught = Collect()
            val r = s.chatStreaming(listOf(ChatMessage("user", "the cat")), p, taught)
            check(r.answeredBy == AnsweredBy.TEACHER && taught.text.toString() == "Hello from the teacher." &&
                r.escalationSignal == null && r.escalationFailure == null) { "escalated: $r '${taught.text}'" }
            s.setEscalation(Escalation("http://127.0.0.1:1", policy = EscalationPolicy.ALWAYS, timeoutMs = 2000))
            val local = Collect()
            val f = s.chatStreaming(listOf(ChatMessage("user", "the cat")), p, local)
            check(f.answeredBy == AnsweredBy.LOCAL_AFTER_TEACHER_FAILED && local.text.isNotEmpty() &&
                f.escalationFailure?.contains("offline") == true) { "offline teacher: $f" }
            expectError(SprigStatus.INVALID_ARGUMENT, "a negative threshold") {
                s.setEscalation(Escalation(teacherUrl, threshold = -1f))
            }
            expectError(SprigStatus.INVALID_ARGUMENT, "an ftp URL") { s.setEscalation(Escalation("ftp://teacher")) }
            expectError(SprigStatus.INVALID_ARGUMENT, "window 0") { s.setEscalation(Escalation(teacherUrl, window = 0)) }
            s.setEscalation(null)
            val plain = s.chatStreaming(listOf(ChatMessage("user", "the cat")), p, Collect())
            check(plain.answeredBy == AnsweredBy.LOCAL && plain.escalationSignal == null) { "escalation off: $plain" }
        }
        // Constrained output and tool calls.
        model.newSession().use { s ->
            val yesNo = Collect()
            val r = s.chatStreaming(listOf(ChatMessage("user", "the cat")), GenerateParams(temperature = 0f,
                maxTokens = 16, regex = "(yes|no)"), yesNo)
            check(r.stopReason == StopReason.STOP_TOKEN && yesNo.text.toString() in setOf("yes", "no")) { "regex: $r ${yesNo.text}" }
            expectError(SprigStatus.INVALID_ARGUMENT, "two constraints") {
                s.chatStreaming(listOf(ChatMessage("user", "x")), GenerateParams(regex = "a", jsonObject = true), Collect())
            }
            expectError(SprigStatus.INVALID_ARGUMENT, "a bad schema") {
                s.chatStreaming(listOf(ChatMessage("user", "x")), GenerateParams(jsonSchema = "{\"type\": 3}"), Collect())
            }
            val short = s.chatStreaming(listOf(ChatMessage("user", "the cat")), GenerateParams(temperature = 0f,
                maxTokens = 1, jsonSchema = "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"string\"}}, \"required\": [\"a\"]}"),
                Collect())
            check(short.stopReason == StopReason.CONSTRAINT_UNSATISFIED) { "too short for the schema: $short" }
            val tools = "[{\"type\": \"function\", \"function\": {\"name\": \"set_mode\", \"parameters\": " +
                "{\"type\": \"object\", \"properties\": {\"mode\": {\"enum\": [\"eco\", \"sport\"]}}, \"required\": [\"mode\"]}}}]"
            val call = s.chatStreaming(listOf(ChatMessage("user", "the cat")), GenerateParams(temperature = 0f,
                maxTokens = 100, tools = tools, toolChoice = "set_mode"), Collect())
            check(call.toolCalls.size == 1 && call.toolCalls[0].name == "set_mode" &&
                call.toolCalls[0].arguments.matches(Regex("\\{\"mode\":\"(eco|sport)\"\\}"))) { "tool call: $call" }
            // The call goes back with the tool's result; the conversation continues.
            val turns = listOf(ChatMessage("user", "the cat"), ChatMessage("assistant", "", toolCalls = call.toolCalls),
                ChatMessage("tool", "done", name = "set_mode"), ChatMessage("user", "and?"))
            val next = s.chatStreaming(turns, GenerateParams(temperature = 0f, maxTokens = 4, tools = tools,
                toolChoice = "none"), Collect())
            check(next.cachedTokens > 0 && next.toolCalls.isEmpty()) { "after the tool result: $next" }
            expectError(SprigStatus.INVALID_ARGUMENT, "tools not an array") {
                s.chatStreaming(listOf(ChatMessage("user", "x")), GenerateParams(tools = "{}"), Collect())
            }
        }
    }

    // The Flow API over the same model.
    SprigModel.load(modelPath, opts).use { model -> flowChecks(model, golden.removePrefix("Once upon a time")) }

    // Load/unload cycles: resident memory stays flat. The JVM runs with a fixed, pre-touched heap (jvm.rs), and
    // growth is measured between two points after a warm-up, so JIT and heap sizing do not count. The detector
    // is then run with a simulated 10 KiB-per-cycle native leak (direct buffers kept alive), which it must see.
    val cycle: () -> Unit = {
        SprigModel.load(modelPath, opts).use { m ->
            m.newSession().use { s -> s.generateStreaming("Once", SamplingParams(temperature = 0f, maxTokens = 2), Collect()) }
        }
    }
    // The real run first: freeing the simulated leak's buffers afterwards would hide growth.
    val real = leakPerCycle(cycle)
    val leaked = ArrayList<java.nio.ByteBuffer>()
    val leaky = leakPerCycle { cycle(); leaked.add(java.nio.ByteBuffer.allocateDirect(10 * 1024)) }
    println("RSS growth per load+unload cycle: %.2f KiB (with a simulated 10 KiB leak: %.2f KiB)".format(real, leaky))
    check(leaky > LEAK_LIMIT_KB) { "the detector missed a simulated 10 KiB/cycle leak ($leaky KiB/cycle)" }
    check(real < LEAK_LIMIT_KB) { "RSS grows by $real KiB per load+unload cycle" }

    if (failures > 0) {
        System.err.println("$failures check(s) failed")
        System.exit(1)
    }
    println("all JVM checks passed")
}
