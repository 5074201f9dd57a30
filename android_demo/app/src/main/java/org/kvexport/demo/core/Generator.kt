package org.kvexport.demo.core

/** Values of the program's metadata methods. */
data class ProgramMeta(
    val maxContextLen: Int,
    val maxSeqLen: Int,
    val vocabSize: Int,
    val bosId: Int,
    val nLayers: Int,
    val layoutVersion: Int,
    val eosIds: Set<Int>,
)

/** kv_stats output of `forward` (layout version 1). */
data class KvStats(
    val bytesAllocated: Double,
    val bytesUsed: Double,
    val avgBitsPerElement: Double,
    val tokens2bit: Long,
    val tokens4bit: Long,
    val tokens8bit: Long,
    val tokens16bit: Long,
    val tokensCached: Long,
) {
    fun summary(): String = String.format(
        "KV %s / %s, %.2f bits avg (2b:%d 4b:%d 8b:%d 16b:%d, %d cached)",
        human(bytesUsed), human(bytesAllocated), avgBitsPerElement, tokens2bit, tokens4bit, tokens8bit, tokens16bit, tokensCached,
    )

    companion object {
        /** The kv_stats fields in vector order: kvexport/kv/stats.py FIELDS, which the bundled
         *  io_contract.json repeats as kv_stats_fields (checked by ProgramContract.parse). */
        val FIELDS = listOf(
            "kv_bytes_allocated", "kv_bytes_used", "avg_bits", "tokens_2bit",
            "tokens_4bit", "tokens_8bit", "tokens_16bit", "tokens_cached",
        )
        val SIZE = FIELDS.size

        fun fromArray(a: FloatArray): KvStats {
            require(a.size == SIZE) { "kv_stats must have $SIZE elements, got ${a.size}" }
            fun f(name: String) = a[FIELDS.indexOf(name)]
            return KvStats(f("kv_bytes_allocated").toDouble(), f("kv_bytes_used").toDouble(), f("avg_bits").toDouble(),
                f("tokens_2bit").toLong(), f("tokens_4bit").toLong(), f("tokens_8bit").toLong(),
                f("tokens_16bit").toLong(), f("tokens_cached").toLong())
        }

        fun human(b: Double): String = when {
            b >= 1 shl 20 -> String.format("%.2f MiB", b / (1 shl 20))
            b >= 1 shl 10 -> String.format("%.1f KiB", b / (1 shl 10))
            else -> String.format("%.0f B", b)
        }
    }
}

class StepOutput(val logits: FloatArray, val kvStats: KvStats)

/** What the decode loop needs from a program (ExecuTorch adapter or a fake). */
interface LlmBackend {
    val meta: ProgramMeta

    /** Run `forward` on [tokens] (1..maxSeqLen ids) whose first token is at [startPos]. */
    fun forward(tokens: IntArray, startPos: Int): StepOutput

    /** Drop the KV state (the ExecuTorch adapter reloads the program). */
    fun reset()
}

enum class StopReason { EOS, MAX_NEW_TOKENS, CONTEXT_FULL, CANCELLED }

class ContextOverflowException(msg: String) : IllegalArgumentException(msg)

class GenerationResult(
    val tokens: List<Int>,
    val stopReason: StopReason,
    val prefillTokens: Int,
    val prefillNanos: Long,
    val decodeSteps: Int,
    val decodeNanos: Long,
    val lastStats: KvStats?,
    /** ids actually written into the KV cache by this call (prompt + fed generated tokens). */
    val fed: List<Int>,
) {
    val decodeTokensPerSecond: Double get() = if (decodeNanos > 0) decodeSteps * 1e9 / decodeNanos else 0.0
    val prefillTokensPerSecond: Double get() = if (prefillNanos > 0) prefillTokens * 1e9 / prefillNanos else 0.0
}

/**
 * The decode loop: chunked prefill (chunks of at most maxSeqLen, each given
 * the position of its first token), then one token at a time until an EOS id
 * is sampled, [maxNewTokens] tokens were produced, or the context is full.
 * EOS tokens are not emitted.  [onToken] returns false to cancel.
 */
class Generator(private val backend: LlmBackend, private val sampler: Sampler) {

    fun generate(
        prompt: IntArray,
        startPos: Int,
        maxNewTokens: Int,
        onToken: (id: Int, stats: KvStats) -> Boolean = { _, _ -> true },
    ): GenerationResult {
        val meta = backend.meta
        require(prompt.isNotEmpty()) { "empty prompt" }
        require(meta.maxSeqLen >= 1) { "max_seq_len must be >= 1" }
        if (startPos + prompt.size > meta.maxContextLen)
            throw ContextOverflowException("prompt of ${prompt.size} tokens at position $startPos exceeds the context of ${meta.maxContextLen}")
        val fed = ArrayList<Int>()
        var pos = startPos
        var out: StepOutput? = null
        val t0 = System.nanoTime()
        var i = 0
        while (i < prompt.size) {
            val n = minOf(meta.maxSeqLen, prompt.size - i)
            val chunk = prompt.copyOfRange(i, i + n)
            out = backend.forward(chunk, pos)
            checkLogits(out.logits, meta)
            pos += n; i += n
            chunk.forEach { fed.add(it) }
        }
        val prefillNanos = System.nanoTime() - t0
        val generated = ArrayList<Int>()
        var stats = out!!.kvStats
        var next = sampler.sample(out.logits)
        var steps = 0
        var decodeNanos = 0L
        val reason: StopReason
        while (true) {
            if (next in meta.eosIds) { reason = StopReason.EOS; break }
            generated.add(next)
            if (!onToken(next, stats)) { reason = StopReason.CANCELLED; break }
            if (generated.size >= maxNewTokens) { reason = StopReason.MAX_NEW_TOKENS; break }
            if (pos >= meta.maxContextLen) { reason = StopReason.CONTEXT_FULL; break }
            val t = System.nanoTime()
            out = backend.forward(intArrayOf(next), pos)
            checkLogits(out.logits, meta)
            fed.add(next)
            pos += 1
            next = sampler.sample(out.logits)
            decodeNanos += System.nanoTime() - t
            steps++
            stats = out.kvStats
        }
        return GenerationResult(generated, reason, prompt.size, prefillNanos, steps, decodeNanos, stats, fed)
    }

    private fun checkLogits(l: FloatArray, meta: ProgramMeta) {
        if (l.size != meta.vocabSize) throw IllegalStateException("logits have ${l.size} entries, vocab is ${meta.vocabSize}")
    }
}

/**
 * Incremental detokenizer for streaming: emits the text added by each new
 * token, holding back while the tail is an incomplete UTF-8 sequence.
 */
class StreamDecoder(private val tokenizer: BpeTokenizer) {
    private val ids = ArrayList<Int>()
    private var emitted = ""

    fun push(id: Int): String {
        ids.add(id)
        val text = tokenizer.decode(ids.toIntArray())
        if (text.endsWith("\uFFFD")) return ""
        val delta = if (text.startsWith(emitted)) text.substring(emitted.length) else text
        emitted = text
        return delta
    }

    val text: String get() = emitted
}

/**
 * A multi-turn chat over one program.  The KV state persists between turns:
 * each turn re-renders the whole conversation, and if the ids already in the
 * cache are a prefix of the new prompt only the rest is fed; otherwise the
 * backend is reset and the whole prompt prefilled.
 */
class ChatSession(
    private val backend: LlmBackend,
    private val tokenizer: BpeTokenizer,
    private val template: ChatTemplate,
    var sampler: Sampler,
) {
    val messages = ArrayList<ChatMessage>()
    private val cached = ArrayList<Int>()
    val position: Int get() = cached.size

    fun reset() {
        backend.reset()
        cached.clear()
        messages.clear()
    }

    fun send(
        user: String,
        maxNewTokens: Int,
        onText: (delta: String, stats: KvStats, nTokens: Int) -> Boolean = { _, _, _ -> true },
    ): Pair<String, GenerationResult> {
        messages.add(ChatMessage("user", user))
        val ids = tokenizer.encode(template.render(messages, true))
        val reuse = ids.size > cached.size && cached.indices.all { cached[it] == ids[it] }
        if (!reuse && cached.isNotEmpty()) { backend.reset(); cached.clear() }
        if (ids.size >= backend.meta.maxContextLen) {
            messages.removeAt(messages.size - 1)
            throw ContextOverflowException("conversation is ${ids.size} tokens, context is ${backend.meta.maxContextLen}: reset the chat")
        }
        val stream = StreamDecoder(tokenizer)
        var n = 0
        val result = Generator(backend, sampler).generate(ids.copyOfRange(cached.size, ids.size), cached.size, maxNewTokens) { id, st ->
            n++
            onText(stream.push(id), st, n)
        }
        cached.addAll(result.fed)
        val reply = tokenizer.decode(result.tokens.toIntArray())
        messages.add(ChatMessage("assistant", reply))
        return reply to result
    }
}
