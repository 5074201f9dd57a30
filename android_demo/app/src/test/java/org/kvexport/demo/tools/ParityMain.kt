package org.kvexport.demo.tools

import org.kvexport.demo.core.BpeTokenizer
import org.kvexport.demo.core.ChatMessage
import org.kvexport.demo.core.ChatTemplate
import org.kvexport.demo.core.Generator
import org.kvexport.demo.core.Json
import org.kvexport.demo.core.Sampler
import org.kvexport.demo.core.StreamDecoder
import org.kvexport.demo.et.ExecuTorchBackend
import org.kvexport.demo.et.MethodRunner
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Tensor
import java.io.File
import kotlin.system.exitProcess

/**
 * Command-line driver used by tests/android (Python compares its output with
 * the Python tokenizer and the ExecuTorch Python runtime):
 *
 *   encode TOKENIZER_JSON CORPUS_JSON OUT_JSON
 *   replay TOKENIZER_JSON REPLAY_JSON OUT_JSON
 */
object ParityMain {
    @JvmStatic
    fun main(args: Array<String>) {
        if (args.size != 4) { System.err.println("usage: encode|replay TOKENIZER IN OUT"); exitProcess(2) }
        val tok = BpeTokenizer.fromJson(File(args[1]).readText())
        val input = Json.parse(File(args[2]).readText())
        val out = when (args[0]) {
            "encode" -> encode(tok, input as List<*>)
            "replay" -> replay(tok, input as Map<*, *>)
            else -> { System.err.println("unknown command ${args[0]}"); exitProcess(2) }
        }
        File(args[3]).writeText(Json.write(out))
    }

    private fun ints(x: Any?): IntArray = (x as List<*>).map { (it as Long).toInt() }.toIntArray()

    private fun encode(tok: BpeTokenizer, corpus: List<*>): List<Any?> = corpus.map { item ->
        val m = item as Map<*, *>
        val text = m["text"] as String
        val ids = tok.encode(text)
        val pyIds = ints(m["py_ids"])
        mapOf(
            "ids" to ids.toList(),
            "pre_tokens" to tok.preTokenize(text),
            "ids_special" to tok.encode(text, addSpecialTokens = true).toList(),
            "decode_py_ids" to tok.decode(pyIds),
            "decode_py_ids_keep_special" to tok.decode(pyIds, skipSpecialTokens = false),
            "decode_prefixes" to (0..pyIds.size).map { tok.decode(pyIds.copyOfRange(0, it)) },
        )
    }

    /** Serves recorded forward outputs; fails on any call that differs from the recording. */
    private class ReplayRunner(rec: Map<*, *>) : MethodRunner {
        private val meta = rec["metadata"] as Map<*, *>
        private val calls = rec["calls"] as List<*>
        private val vocab = (meta["get_vocab_size"] as Long).toInt()
        val seen = ArrayList<Map<String, Any?>>()

        override fun methodNames() = meta.keys.map { it as String }.toSet() + "forward"

        override fun execute(method: String, inputs: Array<EValue>): Array<EValue> {
            if (method == "get_eos_ids") return (meta[method] as List<*>).map { EValue.from(it as Long) }.toTypedArray()
            if (method != "forward") return arrayOf(EValue.from(meta[method] as Long))
            val tokens = inputs[0].toTensor().dataAsLongArray.toList()
            val pos = inputs[1].toTensor().dataAsLongArray.toList()
            seen.add(mapOf("tokens" to tokens, "pos" to pos[0]))
            val k = seen.size - 1
            if (k >= calls.size) throw IllegalStateException("forward call #$k was not recorded (tokens=$tokens pos=$pos)")
            val c = calls[k] as Map<*, *>
            if (c["tokens"] != tokens || c["pos"] != pos[0])
                throw IllegalStateException("forward call #$k: app fed tokens=$tokens pos=${pos[0]}, recording has ${c["tokens"]} pos=${c["pos"]}")
            val logits = FloatArray(vocab) { -1e30f }
            val ids = c["top_ids"] as List<*>
            val vals = c["top_vals"] as List<*>
            for (i in ids.indices) logits[(ids[i] as Long).toInt()] = (vals[i] as Number).toFloat()
            val st = (c["kv_stats"] as List<*>).map { (it as Number).toFloat() }.toFloatArray()
            return arrayOf(EValue.from(Tensor.fromBlob(logits, longArrayOf(1, vocab.toLong()))),
                EValue.from(Tensor.fromBlob(st, longArrayOf(st.size.toLong()))))
        }

        override fun close() {}
    }

    private fun replay(tok: BpeTokenizer, rec: Map<*, *>): Map<String, Any?> {
        val msgs = (rec["messages"] as List<*>).map { val m = it as Map<*, *>; ChatMessage(m["role"] as String, m["content"] as String) }
        val prompt = ChatTemplate(rec["default_system"] as String?).render(msgs, addGenerationPrompt = true)
        val ids = tok.encode(prompt)
        val runner = ReplayRunner(rec)
        val backend = ExecuTorchBackend({ runner })
        val stream = StreamDecoder(tok)
        val streamed = StringBuilder()
        val r = Generator(backend, Sampler()).generate(ids, 0, (rec["max_new_tokens"] as Long).toInt()) { id, _ ->
            streamed.append(stream.push(id)); true
        }
        return mapOf(
            "prompt_text" to prompt,
            "prompt_ids" to ids.toList(),
            "generated" to r.tokens,
            "stop_reason" to r.stopReason.name,
            "calls" to runner.seen,
            "text" to tok.decode(r.tokens.toIntArray()),
            "streamed" to streamed.toString(),
            "kv_stats_last" to r.lastStats?.let { listOf(it.bytesAllocated, it.bytesUsed, it.avgBitsPerElement, it.tokensCached) },
        )
    }
}
