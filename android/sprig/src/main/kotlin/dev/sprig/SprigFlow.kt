// The coroutine surface of the Android library: Flow adapters over the blocking, callback-based binding in
// Sprig.kt. Cancelling the collecting coroutine cancels the native generation, and the flow completes only once
// the native call has returned. Needs kotlinx-coroutines ≥ 1.6 and nothing from android.jar: the host test
// (crates/sprig-ffi/tests/jvm.rs, hostTest/FlowTest.kt) compiles and runs it on the JVM.
package dev.sprig

import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.launch

private fun SprigSession.stream(run: SprigSession.(TokenCallback) -> GenerationResult): Flow<String> = callbackFlow {
    val session = this@stream
    launch(Dispatchers.IO) {
        try {
            session.run(object : TokenCallback {
                // A full buffer makes the native thread wait for the collector (no piece dropped); a closed
                // channel (the collector cancelled or failed) stops the generation. Polled rather than
                // `trySendBlocking`, whose nested runBlocking on this dispatcher thread was seen to hang
                // once the collector had been cancelled (host test, 2-core machine).
                override fun onToken(text: String): Boolean {
                    while (true) {
                        val r = trySend(text)
                        if (r.isSuccess) return true
                        if (r.isClosed) return false
                        Thread.sleep(1)
                    }
                }
            })
            close()
        } catch (e: Throwable) {
            close(e)
        }
    }
    awaitClose { session.cancel() }
}

/** Generated text of [prompt], piece by piece. Cancelling the collector cancels generation. */
fun SprigSession.generate(prompt: String, params: SamplingParams = SamplingParams()): Flow<String> =
    stream { generateStreaming(prompt, params, it) }

/** The model's reply to the last turn of [messages] (chat template applied), piece by piece. */
fun SprigSession.chat(messages: List<ChatMessage>, params: SamplingParams = SamplingParams()): Flow<String> =
    stream { chatStreaming(messages, params, it) }
