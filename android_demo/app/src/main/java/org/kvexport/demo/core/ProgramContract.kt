package org.kvexport.demo.core

/**
 * The I/O contract the app expects (layout version 1), and the reader for
 * `io_contract.json` that `kvexport bundle` writes next to the program in the
 * app's assets.  kvexport/android/bundle.py holds the same expectations in
 * Python (APP_CONTRACT); a JVM test checks that a bundled contract passes
 * [ProgramContract.parse].
 */
class ProgramContract(
    val layoutVersion: Int,
    val program: String,
    val opsMode: String,
    val model: String,
    val meta: ProgramMeta,
    val defaultSystem: String?,
    val tokenizerFile: String,
) {
    companion object {
        const val LAYOUT_VERSION = 1
        val METADATA_METHODS = listOf(
            "get_max_context_len", "get_max_seq_len", "get_vocab_size", "get_bos_id",
            "get_n_layers", "get_layout_version", "get_eos_ids",
        )
        val FORWARD_INPUTS = listOf("tokens" to "int64", "input_pos" to "int64")
        val FORWARD_OUTPUTS = listOf("logits" to "float32", "kv_stats" to "float32")

        class ContractException(msg: String) : IllegalArgumentException(msg)

        private fun fail(msg: String): Nothing = throw ContractException("io_contract.json: $msg")

        fun parse(text: String): ProgramContract {
            val root = Json.parse(text).asMap("io_contract")
            val lv = root["layout_version"].asLong("layout_version").toInt()
            if (lv != LAYOUT_VERSION) fail("layout version $lv, this app understands $LAYOUT_VERSION")
            val methods = root["methods"].asMap("methods")
            val fwd = methods["forward"]?.asMap("forward") ?: fail("no forward method")
            fun io(key: String, want: List<Pair<String, String>>) {
                val got = fwd[key].asList("forward.$key").map { it.asMap("io") }
                if (got.size != want.size) fail("forward has ${got.size} $key, expected ${want.size}")
                for ((g, w) in got.zip(want)) {
                    if (g["name"] != w.first || g["dtype"] != w.second)
                        fail("forward $key ${g["name"]}:${g["dtype"]} where ${w.first}:${w.second} is expected")
                }
            }
            io("inputs", FORWARD_INPUTS)
            io("outputs", FORWARD_OUTPUTS)
            for (m in METADATA_METHODS) if (!methods.containsKey(m)) fail("missing method $m")
            val md = root["metadata"].asMap("metadata")
            fun v(k: String) = (md[k] ?: fail("metadata $k missing")).asLong(k).toInt()
            val meta = ProgramMeta(
                maxContextLen = v("get_max_context_len"), maxSeqLen = v("get_max_seq_len"),
                vocabSize = v("get_vocab_size"), bosId = v("get_bos_id"), nLayers = v("get_n_layers"),
                layoutVersion = v("get_layout_version"),
                eosIds = md["get_eos_ids"].asList("get_eos_ids").map { it.asLong("eos").toInt() }.toSet(),
            )
            if (meta.layoutVersion != LAYOUT_VERSION) fail("get_layout_version is ${meta.layoutVersion}")
            val statsFields = root["kv_stats_fields"].asList("kv_stats_fields")
            if (statsFields != KvStats.FIELDS) fail("kv_stats fields $statsFields, this app reads ${KvStats.FIELDS}")
            val chat = root["chat"]?.asMap("chat")
            val tok = root["tokenizer"]?.asMap("tokenizer")
            return ProgramContract(lv, root["program"] as? String ?: fail("program missing"),
                root["ops_mode"] as? String ?: "unknown", root["model"] as? String ?: "?", meta,
                chat?.get("default_system") as? String, tok?.get("file") as? String ?: "tokenizer.json")
        }
    }
}
