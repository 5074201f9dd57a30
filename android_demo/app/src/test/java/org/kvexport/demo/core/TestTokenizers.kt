package org.kvexport.demo.core

/** A tiny byte-level BPE tokenizer.json built in code for unit tests. */
object TestTokenizers {
    const val IM_START = 300
    const val IM_END = 301
    const val EOT = 302

    fun tinyJson(): String {
        val vocab = LinkedHashMap<String, Any?>()
        for (b in 0 until 256) vocab[ByteLevel.byteToChar[b].toString()] = b.toLong()
        val merged = listOf("he", "ll", "hell", "Ġw", "or", "Ġwor")
        merged.forEachIndexed { k, t -> vocab[t] = (256 + k).toLong() }
        val merges = listOf(listOf("h", "e"), listOf("l", "l"), listOf("he", "ll"), listOf("Ġ", "w"), listOf("o", "r"), listOf("Ġw", "or"))
        fun added(id: Int, c: String) = mapOf("id" to id.toLong(), "content" to c, "single_word" to false,
            "lstrip" to false, "rstrip" to false, "normalized" to false, "special" to true)
        val root = mapOf(
            "version" to "1.0",
            "added_tokens" to listOf(added(IM_START, "<|im_start|>"), added(IM_END, "<|im_end|>"), added(EOT, "<|endoftext|>")),
            "normalizer" to null,
            "pre_tokenizer" to mapOf("type" to "ByteLevel", "add_prefix_space" to false, "trim_offsets" to true, "use_regex" to true),
            "post_processor" to mapOf(
                "type" to "TemplateProcessing",
                "single" to listOf(mapOf("SpecialToken" to mapOf("id" to "<|im_start|>", "type_id" to 0L)),
                    mapOf("Sequence" to mapOf("id" to "A", "type_id" to 0L))),
                "pair" to emptyList<Any>(),
                "special_tokens" to mapOf("<|im_start|>" to mapOf("id" to "<|im_start|>", "ids" to listOf(IM_START.toLong()),
                    "tokens" to listOf("<|im_start|>"))),
            ),
            "decoder" to mapOf("type" to "ByteLevel", "add_prefix_space" to true, "trim_offsets" to true, "use_regex" to true),
            "model" to mapOf("type" to "BPE", "dropout" to null, "unk_token" to null, "continuing_subword_prefix" to null,
                "end_of_word_suffix" to null, "fuse_unk" to false, "byte_fallback" to false, "vocab" to vocab, "merges" to merges),
        )
        return Json.write(root)
    }

    val tiny: BpeTokenizer by lazy { BpeTokenizer.fromJson(tinyJson()) }
}
