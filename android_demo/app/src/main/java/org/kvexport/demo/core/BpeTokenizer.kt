package org.kvexport.demo.core

import java.io.ByteArrayOutputStream

/**
 * Byte-level BPE tokenizer reading a HF `tokenizer.json` (the format SmolLM2
 * ships).  Supported pieces, each behaving like HF `tokenizers`:
 *
 *  - added tokens (special or not): split out of the raw text first,
 *    leftmost-longest, honouring lstrip/rstrip;
 *  - normalizer: none / empty Sequence;
 *  - pre-tokenizer: ByteLevel (GPT-2 split regex, add_prefix_space), Digits,
 *    Sequence of those;
 *  - model: BPE with merges (as "a b" strings or [a, b] pairs), ignore_merges,
 *    unk token, byte_fallback;
 *  - post-processor: TemplateProcessing (single), ByteLevel, none;
 *  - decoder: ByteLevel, ByteFallback, Fuse, Replace(String), Sequence.
 *
 * Anything else fails loudly at load time rather than tokenising differently.
 */
class BpeTokenizer private constructor(
    private val vocab: HashMap<String, Int>,
    private val idToToken: Array<String?>,
    private val mergeRanks: HashMap<String, Int>,
    private val added: List<AddedToken>,
    private val preSteps: List<String>,           // "bytelevel", "bytelevel+prefix", "digits", "digits-individual"
    private val byteLevelSplit: Boolean,
    private val decoderSteps: List<DecoderStep>,
    private val singleTemplate: List<TemplatePiece>?,
    private val unkId: Int?,
    private val byteFallback: Boolean,
    private val ignoreMerges: Boolean,
) {
    class AddedToken(val id: Int, val content: String, val special: Boolean, val lstrip: Boolean, val rstrip: Boolean)

    sealed class TemplatePiece {
        class Special(val ids: List<Int>) : TemplatePiece()
        object Sequence : TemplatePiece()
    }

    sealed class DecoderStep {
        object ByteLevelStep : DecoderStep()
        object ByteFallbackStep : DecoderStep()
        object FuseStep : DecoderStep()
        class ReplaceStep(val pattern: String, val content: String) : DecoderStep()
    }

    private val specialIds: Set<Int> = added.filter { it.special }.map { it.id }.toHashSet()
    private val addedByLength = added.sortedByDescending { it.content.length }
    private val cache = HashMap<String, IntArray>()

    val vocabSize: Int get() = idToToken.size

    fun tokenToId(token: String): Int? = added.firstOrNull { it.content == token }?.id ?: vocab[token]
    fun idToToken(id: Int): String? = idToToken.getOrNull(id)
    fun isSpecial(id: Int): Boolean = id in specialIds

    // ------------------------------------------------------------ encode
    fun encode(text: String, addSpecialTokens: Boolean = false): IntArray {
        val ids = ArrayList<Int>()
        for (seg in splitAdded(text)) {
            if (seg.first != null) ids.add(seg.first!!) else encodeOrdinary(seg.second, ids)
        }
        if (!addSpecialTokens || singleTemplate == null) return ids.toIntArray()
        val out = ArrayList<Int>()
        for (p in singleTemplate) when (p) {
            is TemplatePiece.Special -> out.addAll(p.ids)
            TemplatePiece.Sequence -> out.addAll(ids)
        }
        return out.toIntArray()
    }

    /** Segments: (addedTokenId, "") or (null, ordinaryText). */
    private fun splitAdded(text: String): List<Pair<Int?, String>> {
        val out = ArrayList<Pair<Int?, String>>()
        if (added.isEmpty()) { out.add(null to text); return out }
        var segStart = 0
        var i = 0
        while (i < text.length) {
            val tok = addedByLength.firstOrNull { it.content.isNotEmpty() && text.startsWith(it.content, i) }
            if (tok == null) { i++; continue }
            var before = text.substring(segStart, i)
            if (tok.lstrip) before = before.trimEnd()
            if (before.isNotEmpty()) out.add(null to before)
            out.add(tok.id to "")
            i += tok.content.length
            if (tok.rstrip) while (i < text.length && text[i].isWhitespace()) i++
            segStart = i
        }
        if (segStart < text.length) out.add(null to text.substring(segStart))
        return out
    }

    private fun encodeOrdinary(text: String, ids: MutableList<Int>) {
        for (p in preTokenize(text)) if (p.isNotEmpty()) for (id in bpe(p)) ids.add(id)
    }

    /** Pre-tokenizer output for text without added tokens (byte-level chars), like `pre_tokenize_str`. */
    fun preTokenize(text: String): List<String> {
        var pieces = listOf(text)
        for (step in preSteps) {
            pieces = when (step) {
                "digits-individual" -> pieces.flatMap { splitDigits(it, true) }
                "digits" -> pieces.flatMap { splitDigits(it, false) }
                "bytelevel", "bytelevel+prefix" -> pieces.flatMap { p ->
                    val q = if (step == "bytelevel+prefix" && p.isNotEmpty() && !p.startsWith(" ")) " $p" else p
                    (if (byteLevelSplit) ByteLevel.split(q) else listOf(q)).map { ByteLevel.encodeBytes(it) }
                }
                else -> throw IllegalStateException(step)
            }
        }
        return pieces
    }

    private fun splitDigits(s: String, individual: Boolean): List<String> {
        val out = ArrayList<String>()
        var i = 0
        while (i < s.length) {
            val d = s[i].isDigit()
            var j = i + 1
            if (!(d && individual)) while (j < s.length && s[j].isDigit() == d) j++
            out.add(s.substring(i, j)); i = j
        }
        return out
    }

    private fun bpe(word: String): IntArray {
        cache[word]?.let { return it }
        if (ignoreMerges) vocab[word]?.let { return intArrayOf(it).also { r -> cache[word] = r } }
        val syms = ArrayList<String>(word.length)
        var k = 0
        while (k < word.length) {
            val cp = word.codePointAt(k); val l = Character.charCount(cp)
            syms.add(word.substring(k, k + l)); k += l
        }
        while (syms.size > 1) {
            var best = Int.MAX_VALUE
            var bestIdx = -1
            for (i in 0 until syms.size - 1) {
                val r = mergeRanks[syms[i] + '\u0000' + syms[i + 1]] ?: continue
                if (r < best) { best = r; bestIdx = i }
            }
            if (bestIdx < 0) break
            val a = syms[bestIdx]; val b = syms[bestIdx + 1]
            val merged = ArrayList<String>(syms.size)
            var i = 0
            while (i < syms.size) {
                if (i < syms.size - 1 && syms[i] == a && syms[i + 1] == b) { merged.add(a + b); i += 2 } else { merged.add(syms[i]); i++ }
            }
            syms.clear(); syms.addAll(merged)
        }
        val out = ArrayList<Int>(syms.size)
        for (s in syms) {
            val id = vocab[s]
            if (id != null) { out.add(id); continue }
            if (byteFallback) {
                val bytes = s.toByteArray(Charsets.UTF_8)
                val bt = bytes.map { vocab[String.format("<0x%02X>", it.toInt() and 0xff)] }
                if (bt.all { it != null }) { bt.forEach { out.add(it!!) }; continue }
            }
            out.add(unkId ?: throw IllegalArgumentException("token '$s' not in vocab and no unk token"))
        }
        return out.toIntArray().also { if (cache.size < 100_000) cache[word] = it }
    }

    // ------------------------------------------------------------ decode
    fun decode(ids: IntArray, skipSpecialTokens: Boolean = true): String {
        var toks: List<String> = ids.filter { !(skipSpecialTokens && it in specialIds) }.mapNotNull { idToToken.getOrNull(it) }
        for (step in decoderSteps) toks = when (step) {
            DecoderStep.FuseStep -> listOf(toks.joinToString(""))
            is DecoderStep.ReplaceStep -> toks.map { it.replace(step.pattern, step.content) }
            DecoderStep.ByteFallbackStep -> byteFallbackDecode(toks)
            DecoderStep.ByteLevelStep -> {
                val bos = ByteArrayOutputStream()
                for (t in toks) bos.write(ByteLevel.decodeChars(t) ?: t.toByteArray(Charsets.UTF_8))
                listOf(Utf8.decodeLossy(bos.toByteArray()))
            }
        }
        return toks.joinToString("")
    }

    private fun byteFallbackDecode(toks: List<String>): List<String> {
        val out = ArrayList<String>()
        val pending = ByteArrayOutputStream()
        var pendingCount = 0
        fun flush() {
            if (pendingCount == 0) return
            val bytes = pending.toByteArray()
            val s = Utf8.decodeStrict(bytes)
            if (s != null) out.add(s) else repeat(pendingCount) { out.add("\uFFFD") }
            pending.reset(); pendingCount = 0
        }
        for (t in toks) {
            if (t.length == 6 && t.startsWith("<0x") && t.endsWith(">")) {
                val v = t.substring(3, 5).toIntOrNull(16)
                if (v != null) { pending.write(v); pendingCount++; continue }
            }
            flush(); out.add(t)
        }
        flush()
        return out
    }

    companion object {
        fun fromJson(text: String): BpeTokenizer {
            val root = Json.parse(text).asMap("tokenizer.json")
            val model = root["model"].asMap("model")
            if (model["type"] != "BPE") throw IllegalArgumentException("tokenizer model type ${model["type"]} is not supported (need BPE)")
            if (model["continuing_subword_prefix"] != null || model["end_of_word_suffix"] != null)
                throw IllegalArgumentException("BPE subword prefix/suffix are not supported")
            val vocab = HashMap<String, Int>()
            for ((k, v) in model["vocab"].asMap("model.vocab")) vocab[k] = v.asLong("vocab id").toInt()
            val ranks = HashMap<String, Int>()
            for ((r, m) in model["merges"].asList("model.merges").withIndex()) {
                val (a, b) = when (m) {
                    is String -> { val sp = m.indexOf(' '); m.substring(0, sp) to m.substring(sp + 1) }
                    is List<*> -> (m[0] as String) to (m[1] as String)
                    else -> throw IllegalArgumentException("bad merge entry")
                }
                val key = a + "\u0000" + b
                if (key !in ranks) ranks[key] = r
            }
            val added = (root["added_tokens"] as? List<*> ?: emptyList<Any>()).map {
                val t = it.asMap("added token")
                AddedToken(t["id"].asLong("id").toInt(), t["content"] as String, t["special"] == true,
                    t["lstrip"] == true, t["rstrip"] == true)
            }
            var maxId = vocab.values.maxOrNull() ?: -1
            added.forEach { maxId = maxOf(maxId, it.id) }
            val idToToken = arrayOfNulls<String>(maxId + 1)
            for ((k, v) in vocab) idToToken[v] = k
            for (a in added) idToToken[a.id] = a.content

            // normalizer
            val norm = root["normalizer"]
            if (norm != null) {
                val n = norm.asMap("normalizer")
                if (!(n["type"] == "Sequence" && (n["normalizers"] as? List<*>).isNullOrEmpty()))
                    throw IllegalArgumentException("normalizer ${n["type"]} is not supported")
            }
            // pre-tokenizer
            val pre = ArrayList<String>()
            var split = true
            fun addPre(p: Map<String, Any?>) {
                when (p["type"]) {
                    "ByteLevel" -> { pre.add(if (p["add_prefix_space"] == true) "bytelevel+prefix" else "bytelevel"); split = p["use_regex"] != false }
                    "Digits" -> pre.add(if (p["individual_digits"] == true) "digits-individual" else "digits")
                    "Sequence" -> p["pretokenizers"].asList("pretokenizers").forEach { addPre(it.asMap("pre-tokenizer")) }
                    else -> throw IllegalArgumentException("pre-tokenizer ${p["type"]} is not supported")
                }
            }
            root["pre_tokenizer"]?.let { addPre(it.asMap("pre_tokenizer")) }
            if (pre.none { it.startsWith("bytelevel") }) throw IllegalArgumentException("not a byte-level tokenizer (no ByteLevel pre-tokenizer)")
            // decoder
            val dec = ArrayList<DecoderStep>()
            fun addDec(d: Map<String, Any?>) {
                when (d["type"]) {
                    "ByteLevel" -> dec.add(DecoderStep.ByteLevelStep)
                    "ByteFallback" -> dec.add(DecoderStep.ByteFallbackStep)
                    "Fuse" -> dec.add(DecoderStep.FuseStep)
                    "Replace" -> {
                        val pat = d["pattern"].asMap("Replace.pattern")["String"] as? String
                            ?: throw IllegalArgumentException("Replace decoder: only String patterns are supported")
                        dec.add(DecoderStep.ReplaceStep(pat, d["content"] as String))
                    }
                    "Sequence" -> d["decoders"].asList("decoders").forEach { addDec(it.asMap("decoder")) }
                    else -> throw IllegalArgumentException("decoder ${d["type"]} is not supported")
                }
            }
            root["decoder"]?.let { addDec(it.asMap("decoder")) }
            // post-processor
            var single: List<TemplatePiece>? = null
            root["post_processor"]?.let { pp0 ->
                val pp = pp0.asMap("post_processor")
                when (pp["type"]) {
                    "TemplateProcessing" -> {
                        val specials = pp["special_tokens"].asMap("special_tokens")
                        single = pp["single"].asList("single").map { item ->
                            val m = item.asMap("template item")
                            when {
                                m.containsKey("Sequence") -> TemplatePiece.Sequence
                                m.containsKey("SpecialToken") -> {
                                    val name = m["SpecialToken"].asMap("SpecialToken")["id"] as String
                                    TemplatePiece.Special(specials[name].asMap("special $name")["ids"].asList("ids").map { it.asLong("id").toInt() })
                                }
                                else -> throw IllegalArgumentException("bad template item")
                            }
                        }
                    }
                    "ByteLevel" -> {}
                    else -> throw IllegalArgumentException("post-processor ${pp["type"]} is not supported")
                }
            }
            val unk = (model["unk_token"] as? String)?.let { vocab[it] ?: added.firstOrNull { a -> a.content == it }?.id }
            return BpeTokenizer(vocab, idToToken, ranks, added, pre, split, dec, single, unk,
                model["byte_fallback"] == true, model["ignore_merges"] == true)
        }
    }
}

/** UTF-8 decoding with the same replacement policy as Rust's `String::from_utf8_lossy`. */
object Utf8 {
    fun decodeLossy(b: ByteArray): String = decode(b, true)!!
    fun decodeStrict(b: ByteArray): String? = decode(b, false)

    private fun decode(b: ByteArray, lossy: Boolean): String? {
        val sb = StringBuilder(b.size)
        var i = 0
        while (i < b.size) {
            val c = b[i].toInt() and 0xff
            if (c < 0x80) { sb.append(c.toChar()); i++; continue }
            val (need, lo, hi) = when (c) {
                in 0xC2..0xDF -> Triple(1, 0x80, 0xBF)
                0xE0 -> Triple(2, 0xA0, 0xBF)
                in 0xE1..0xEC, 0xEE, 0xEF -> Triple(2, 0x80, 0xBF)
                0xED -> Triple(2, 0x80, 0x9F)
                0xF0 -> Triple(3, 0x90, 0xBF)
                in 0xF1..0xF3 -> Triple(3, 0x80, 0xBF)
                0xF4 -> Triple(3, 0x80, 0x8F)
                else -> Triple(0, 0, 0)
            }
            if (need == 0) { if (!lossy) return null; sb.append('\uFFFD'); i++; continue }
            var cp = c and (0x3F shr need)
            var j = 1
            var ok = true
            while (j <= need) {
                if (i + j >= b.size) { ok = false; break }
                val x = b[i + j].toInt() and 0xff
                val (l, h) = if (j == 1) lo to hi else 0x80 to 0xBF
                if (x < l || x > h) { ok = false; break }
                cp = (cp shl 6) or (x and 0x3F)
                j++
            }
            if (!ok) { if (!lossy) return null; sb.append('\uFFFD'); i += j; continue }
            sb.appendCodePoint(cp)
            i += need + 1
        }
        return sb.toString()
    }
}
