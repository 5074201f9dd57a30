package org.kvexport.demo.core

/**
 * GPT-2 style byte-level helpers, as used by HF `tokenizers` ByteLevel
 * pre-tokenizer/decoder.
 */
object ByteLevel {
    /** byte (0..255) -> printable unicode char, GPT-2's `bytes_to_unicode`. */
    val byteToChar: CharArray
    /** inverse map, indexed by char code (only chars < 512 occur). */
    private val charToByte = IntArray(512) { -1 }

    init {
        val bs = ArrayList<Int>()
        bs.addAll('!'.code..'~'.code); bs.addAll('¡'.code..'¬'.code); bs.addAll('®'.code..'ÿ'.code)
        val cs = ArrayList<Int>(bs)
        var n = 0
        for (b in 0 until 256) if (b !in bs) { bs.add(b); cs.add(256 + n); n++ }
        byteToChar = CharArray(256)
        for (k in bs.indices) { byteToChar[bs[k]] = cs[k].toChar(); charToByte[cs[k]] = bs[k] }
    }

    fun encodeBytes(text: String): String {
        val bytes = text.toByteArray(Charsets.UTF_8)
        val sb = StringBuilder(bytes.size)
        for (b in bytes) sb.append(byteToChar[b.toInt() and 0xff])
        return sb.toString()
    }

    /** bytes of [token] if every char is a byte-level char, else null. */
    fun decodeChars(token: String): ByteArray? {
        val out = ByteArray(token.length)
        for ((k, c) in token.withIndex()) {
            val b = if (c.code < 512) charToByte[c.code] else -1
            if (b < 0) return null
            out[k] = b.toByte()
        }
        return out
    }

    // ------------------------------------------------------------ pre-tokenizer
    // Hand-written equivalent of the GPT-2 regex that `tokenizers` uses:
    //   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    // (written out to avoid differences between java.util.regex, Android's ICU
    // regex and Rust's regex in what \s matches).

    fun isWhitespace(cp: Int): Boolean = when (cp) {
        in 0x09..0x0D, 0x20, 0x85, 0xA0, 0x1680, in 0x2000..0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000 -> true
        else -> false
    }

    fun isLetter(cp: Int): Boolean = when (Character.getType(cp)) {
        Character.UPPERCASE_LETTER.toInt(), Character.LOWERCASE_LETTER.toInt(), Character.TITLECASE_LETTER.toInt(),
        Character.MODIFIER_LETTER.toInt(), Character.OTHER_LETTER.toInt() -> true
        else -> false
    }

    fun isNumber(cp: Int): Boolean = when (Character.getType(cp)) {
        Character.DECIMAL_DIGIT_NUMBER.toInt(), Character.LETTER_NUMBER.toInt(), Character.OTHER_NUMBER.toInt() -> true
        else -> false
    }

    /** Code points of [s] (String.codePoints() is API 24+ on Android). */
    fun codePoints(s: String): IntArray {
        val out = IntArray(s.codePointCount(0, s.length))
        var i = 0
        var k = 0
        while (i < s.length) { val cp = s.codePointAt(i); out[k++] = cp; i += Character.charCount(cp) }
        return out
    }

    private val contractions = arrayOf("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

    /** Split [text] like the GPT-2 regex; returns the matched pieces in order. */
    fun split(text: String): List<String> {
        val cps = codePoints(text)
        val out = ArrayList<String>()
        var i = 0
        val n = cps.size
        fun piece(a: Int, b: Int) = out.add(String(cps, a, b - a))
        fun run(from: Int, pred: (Int) -> Boolean): Int { var j = from; while (j < n && pred(cps[j])) j++; return j }
        val other = { cp: Int -> !isWhitespace(cp) && !isLetter(cp) && !isNumber(cp) }
        while (i < n) {
            // 1. contractions
            if (cps[i] == '\''.code) {
                val c = contractions.firstOrNull { w -> w.length <= n - i && (w.indices).all { cps[i + it] == w[it].code } }
                if (c != null) { piece(i, i + c.length); i += c.length; continue }
            }
            // 2-4. optional single space followed by a run of letters / numbers / other
            val start = i
            val j = if (cps[i] == ' '.code && i + 1 < n) i + 1 else i
            val classes = listOf(::isLetter, ::isNumber, other)
            var matched = false
            for (cls in classes) {
                if (cls(cps[j])) {
                    val e = run(j, cls)
                    piece(start, e); i = e; matched = true; break
                }
            }
            if (matched) continue
            // 5. \s+(?!\S)   6. \s+
            if (isWhitespace(cps[i])) {
                val e = run(i, ::isWhitespace)
                val end = if (e == n) e else if (e - i >= 2) e - 1 else e
                piece(i, end); i = end; continue
            }
            // unreachable: every code point is whitespace, letter, number or other
            piece(i, i + 1); i++
        }
        return out
    }
}
