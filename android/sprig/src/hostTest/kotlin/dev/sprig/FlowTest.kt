// Host-JVM test of the coroutine surface (SprigFlow.kt) over the real JNI binding: collecting, take(n)
// cancelling the native generation, cancelling the collecting coroutine, errors from either side, a slow
// collector (backpressure: no piece lost), and two sessions collected at once. Called from HostTest.kt.
package dev.sprig

import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.collect
import kotlinx.coroutines.flow.onEach
import kotlinx.coroutines.flow.take
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout

/** [continuation]: the golden text after the prompt "Once upon a time" (greedy, 252 tokens). */
internal fun flowChecks(model: SprigModel, continuation: String) = runBlocking {
    val greedy = SamplingParams(temperature = 0f, maxTokens = 252)
    val prompt = "Once upon a time"

    /** The session is idle again: a generation right away is not refused with BUSY. */
    fun idle(s: SprigSession, what: String) {
        try {
            s.reset()
            s.generateStreaming("Once", greedy.copy(maxTokens = 1), Collect())
        } catch (e: SprigException) {
            check(false) { "$what: the native generation still runs (${e.code} ${e.message})" }
        }
    }

    model.newSession().use { s ->
        // Collect: the whole golden text, in pieces.
        val pieces = withTimeout(60_000) { s.generate(prompt, greedy).toList() }
        check(pieces.joinToString("") == continuation) { "flow text differs: ${pieces.joinToString("")}" }
        check(pieces.size > 100) { "flow gave ${pieces.size} pieces: not streamed" }

        // take(n) ends the collection after n pieces and cancels the native generation before returning.
        s.reset()
        val three = withTimeout(60_000) { s.generate(prompt, greedy).take(3).toList() }
        check(three.size == 3 && continuation.startsWith(three.joinToString(""))) { "take(3): $three" }
        idle(s, "after take(3)")

        // Cancelling the collecting coroutine cancels the native generation.
        s.reset()
        var seen = 0
        val job = launch(Dispatchers.Default) {
            s.generate(prompt, greedy).collect { seen++; delay(1) }
        }
        while (seen < 5) delay(1)
        job.cancel()
        job.join()
        check(seen in 5..251) { "collector cancelled after $seen pieces" }
        idle(s, "after the collector's cancellation")

        // A native error reaches the collector as SprigException.
        s.reset()
        try {
            s.generate(prompt, greedy.copy(temperature = -1f)).toList()
            check(false) { "bad temperature: no exception from the flow" }
        } catch (e: SprigException) {
            check(e.status == SprigStatus.INVALID_ARGUMENT) { "bad temperature: code ${e.code}" }
        }

        // An exception thrown by the collector propagates and stops the native generation.
        s.reset()
        try {
            s.generate(prompt, greedy).collect { throw IllegalStateException("from collector") }
            check(false) { "collector exception swallowed" }
        } catch (e: IllegalStateException) {
            check(e.message == "from collector") { "wrong exception ${e.message}" }
        }
        idle(s, "after the collector's exception")

        // A slow collector: the producer waits (buffer full) instead of dropping pieces.
        s.reset()
        val slow = withTimeout(120_000) { s.generate(prompt, greedy).onEach { delay(2) }.toList() }
        check(slow.joinToString("") == continuation) { "slow collector lost text: ${slow.joinToString("")}" }
    }

    // Two sessions of one model collected concurrently, each with the whole golden text.
    model.newSession().use { a ->
        model.newSession().use { b ->
            val ta = async(Dispatchers.Default) { a.generate(prompt, greedy).toList().joinToString("") }
            val tb = async(Dispatchers.Default) { b.generate(prompt, greedy).toList().joinToString("") }
            val (ra, rb) = withTimeout(120_000) { Pair(ta.await(), tb.await()) }
            check(ra == continuation && rb == continuation) { "concurrent sessions: '$ra' / '$rb'" }
        }
    }
    println("flow checks done")
}
