// Minimal sample: load a model from the app's files directory, then chat with streamed replies.
// Put a model there first, e.g. `adb push smollm2-135m-instruct.safetensors /sdcard/Download/` and copy it to
// the app's files dir (or `adb shell run-as dev.sprig.sample cp /sdcard/Download/... files/model.safetensors`).
package dev.sprig.sample

import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import androidx.lifecycle.lifecycleScope
import dev.sprig.ChatMessage
import dev.sprig.ModelOptions
import dev.sprig.SamplingParams
import dev.sprig.SprigException
import dev.sprig.SprigModel
import dev.sprig.SprigSession
import dev.sprig.chat
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import java.io.File

class MainActivity : AppCompatActivity() {
    private var model: SprigModel? = null
    private var session: SprigSession? = null
    private val messages = mutableListOf<ChatMessage>()
    private var reply: Job? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val transcript = TextView(this)
        val input = EditText(this).apply { hint = "Ask something" }
        val send = Button(this).apply { text = "Send" }
        val stop = Button(this).apply { text = "Stop" }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            addView(ScrollView(context).apply { addView(transcript) }, LinearLayout.LayoutParams(-1, 0, 1f))
            addView(input)
            addView(send)
            addView(stop)
        })

        lifecycleScope.launch {
            transcript.text = "Loading…\n"
            try {
                val m = withContext(Dispatchers.IO) {
                    SprigModel.load(File(filesDir, "model.safetensors").path, ModelOptions(threads = 4, contextLength = 2048))
                }
                model = m
                session = m.newSession()
                transcript.append("Model loaded (sprig ${SprigModel.version}).\n")
            } catch (e: SprigException) {
                transcript.append("Could not load the model: ${e.message}\n")
            }
        }

        send.setOnClickListener {
            val s = session ?: return@setOnClickListener
            val text = input.text.toString().trim()
            if (text.isEmpty() || reply?.isActive == true) return@setOnClickListener
            input.text.clear()
            messages += ChatMessage("user", text)
            transcript.append("\n> $text\n")
            reply = lifecycleScope.launch {
                val answer = StringBuilder()
                try {
                    s.chat(messages, SamplingParams(temperature = 0.7f, maxTokens = 256)).collect { piece ->
                        answer.append(piece)
                        transcript.append(piece)
                    }
                } catch (e: SprigException) {
                    transcript.append("\n[error: ${e.message}]")
                }
                messages += ChatMessage("assistant", answer.toString().trim())
            }
        }
        // Cancelling the collecting coroutine cancels the native generation.
        stop.setOnClickListener { reply?.cancel() }
    }

    override fun onDestroy() {
        reply?.cancel()
        session?.close()
        model?.close()
        super.onDestroy()
    }
}
