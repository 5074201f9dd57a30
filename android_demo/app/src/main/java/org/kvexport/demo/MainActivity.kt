package org.kvexport.demo

import android.app.Activity
import android.graphics.Typeface
import android.os.Bundle
import android.view.ViewGroup
import android.widget.Button
import android.widget.CheckBox
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import org.kvexport.demo.core.BpeTokenizer
import org.kvexport.demo.core.ChatSession
import org.kvexport.demo.core.ChatTemplate
import org.kvexport.demo.core.ProgramContract
import org.kvexport.demo.core.Sampler
import org.kvexport.demo.et.ExecuTorchBackend
import org.kvexport.demo.et.ModuleRunner
import java.io.File

/**
 * Plain-Activity chat UI (no AndroidX).  Assets (put there by
 * `kvexport bundle graphs/<name> android_demo/`): io_contract.json,
 * the .pte named in it, tokenizer.json.
 */
class MainActivity : Activity() {
    private lateinit var output: TextView
    private lateinit var status: TextView
    private lateinit var stats: TextView
    private lateinit var input: EditText
    private lateinit var send: Button
    private lateinit var sample: CheckBox
    private lateinit var scroll: ScrollView
    @Volatile private var session: ChatSession? = null
    @Volatile private var busy = false

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val pad = (8 * resources.displayMetrics.density).toInt()
        val root = LinearLayout(this).apply { orientation = LinearLayout.VERTICAL; setPadding(pad, pad, pad, pad) }
        status = TextView(this).apply { text = "Loading program…" }
        stats = TextView(this).apply { typeface = Typeface.MONOSPACE; textSize = 12f }
        output = TextView(this).apply { setTextIsSelectable(true) }
        scroll = ScrollView(this).apply { addView(output) }
        input = EditText(this).apply { hint = "Message"; setSingleLine(false); maxLines = 4 }
        sample = CheckBox(this).apply { text = "Sample (T=0.7, top-p=0.9); off = greedy" }
        send = Button(this).apply { text = "Send"; isEnabled = false; setOnClickListener { onSend() } }
        val reset = Button(this).apply { text = "New chat"; setOnClickListener { onReset() } }
        val buttons = LinearLayout(this).apply { orientation = LinearLayout.HORIZONTAL; addView(send); addView(reset) }
        root.addView(status)
        root.addView(stats)
        root.addView(scroll, LinearLayout.LayoutParams(ViewGroup.LayoutParams.MATCH_PARENT, 0, 1f))
        root.addView(input)
        root.addView(sample)
        root.addView(buttons)
        setContentView(root)
        Thread { load() }.start()
    }

    private fun ui(block: () -> Unit) = runOnUiThread(block)

    /** Copy an asset to filesDir (Module.load needs a file path to mmap). */
    private fun stage(name: String): File {
        val dst = File(filesDir, name)
        val size = assets.openFd(name).use { it.length }  // works because the program is stored uncompressed
        if (!dst.exists() || dst.length() != size) {
            assets.open(name).use { src -> dst.outputStream().use { src.copyTo(it, 1 shl 20) } }
        }
        return dst
    }

    private fun load() {
        try {
            val contract = ProgramContract.parse(assets.open("io_contract.json").bufferedReader().readText())
            if (contract.opsMode == "fused") {
                ui { status.text = "Note: ops_mode=fused needs a custom ExecuTorch runtime with kvexport kernels." }
            }
            val pte = stage(contract.program)
            val tokenizer = BpeTokenizer.fromJson(assets.open(contract.tokenizerFile).bufferedReader().readText())
            val backend = ExecuTorchBackend({ ModuleRunner(pte.absolutePath) }, contract)
            session = ChatSession(backend, tokenizer, ChatTemplate(contract.defaultSystem), Sampler())
            val m = backend.meta
            ui {
                status.text = "${contract.model} [${contract.opsMode}] ctx=${m.maxContextLen} chunk=${m.maxSeqLen}"
                send.isEnabled = true
            }
        } catch (t: Throwable) {
            ui { status.text = "Load failed: ${t.javaClass.simpleName}: ${t.message}" }
        }
    }

    private fun onReset() {
        val s = session ?: return
        if (busy) return
        Thread { s.reset(); ui { output.text = ""; stats.text = "" } }.start()
    }

    private fun onSend() {
        val s = session ?: return
        val text = input.text.toString().trim()
        if (busy || text.isEmpty()) return
        busy = true
        send.isEnabled = false
        input.setText("")
        output.append("\n> $text\n")
        s.sampler = if (sample.isChecked) Sampler(0.7f, 0.9f, System.nanoTime()) else Sampler()
        Thread {
            val t0 = System.nanoTime()
            try {
                val (_, r) = s.send(text, maxNewTokens = 256) { delta, st, n ->
                    val tps = n * 1e9 / (System.nanoTime() - t0)
                    ui {
                        output.append(delta)
                        stats.text = String.format("%d tokens, %.1f tok/s (incl. prefill)\n%s", n, tps, st.summary())
                        scroll.post { scroll.fullScroll(ScrollView.FOCUS_DOWN) }
                    }
                    true
                }
                ui {
                    output.append("\n")
                    stats.text = String.format(
                        "prefill %d tok %.1f tok/s | decode %d tok %.1f tok/s | stop: %s | pos %d\n%s",
                        r.prefillTokens, r.prefillTokensPerSecond, r.decodeSteps, r.decodeTokensPerSecond,
                        r.stopReason, s.position, r.lastStats?.summary() ?: "",
                    )
                }
            } catch (t: Throwable) {
                ui { output.append("\n[error] ${t.message}\n") }
            } finally {
                busy = false
                ui { send.isEnabled = true }
            }
        }.start()
    }
}
