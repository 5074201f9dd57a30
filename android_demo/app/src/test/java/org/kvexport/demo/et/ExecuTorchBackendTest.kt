package org.kvexport.demo.et

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Assume.assumeTrue
import org.junit.Test
import org.kvexport.demo.core.Generator
import org.kvexport.demo.core.ProgramContract
import org.kvexport.demo.core.Sampler
import org.kvexport.demo.core.StopReason
import org.pytorch.executorch.DType
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Tensor
import java.io.File

/** A program double speaking the contract with real ExecuTorch Tensor/EValue objects. */
class FakeRunner(
    private val metadata: Map<String, Long> = mapOf(
        "get_max_context_len" to 16L, "get_max_seq_len" to 4L, "get_vocab_size" to 10L, "get_bos_id" to 1L,
        "get_n_layers" to 2L, "get_layout_version" to 1L,
    ),
    private val eos: List<Long> = listOf(2L),
    private val names: Set<String> = metadata.keys + setOf("forward", "get_eos_ids"),
    private val logitsDtype: DType = DType.FLOAT,
) : MethodRunner {
    val inputs = ArrayList<Array<EValue>>()
    var closed = false

    override fun methodNames() = names

    override fun execute(method: String, inputs: Array<EValue>): Array<EValue> {
        check(!closed)
        if (method == "get_eos_ids") return eos.map { EValue.from(it) }.toTypedArray()
        metadata[method]?.let { return arrayOf(EValue.from(it)) }
        check(method == "forward")
        this.inputs.add(inputs)
        val t = inputs[0].toTensor().dataAsLongArray
        val pos = inputs[1].toTensor().dataAsLongArray[0]
        val v = metadata.getValue("get_vocab_size").toInt()
        // next token = (last token + 1) % vocab, so 5 -> 6 -> 7 ...
        val logits = FloatArray(v) { 0f }.also { it[((t.last() + 1) % v).toInt()] = 3f }
        val lt = if (logitsDtype == DType.FLOAT) Tensor.fromBlob(logits, longArrayOf(1, v.toLong()))
        else Tensor.fromBlob(IntArray(v), longArrayOf(1, v.toLong()))
        val n = (pos + t.size).toFloat()
        val stats = floatArrayOf(4096f, n * 64, 3.5f, 1f, 2f, 3f, 4f, n)
        return arrayOf(EValue.from(lt), EValue.from(Tensor.fromBlob(stats, longArrayOf(8))))
    }

    override fun close() { closed = true }
}

class EtCodecTest {
    @Test fun tokenAndPositionTensorsAreInt64WithContractShapes() {
        val t = EtCodec.tokens(intArrayOf(7, 8, 9)).toTensor()
        assertEquals(DType.INT64, t.dtype())
        assertArrayEquals(longArrayOf(1, 3), t.shape())
        assertArrayEquals(longArrayOf(7, 8, 9), t.dataAsLongArray)
        val p = EtCodec.position(42).toTensor()
        assertEquals(DType.INT64, p.dtype())
        assertArrayEquals(longArrayOf(1), p.shape())
        assertArrayEquals(longArrayOf(42), p.dataAsLongArray)
    }

    @Test fun scalarsFromIntOrTensor() {
        assertEquals(5L, EtCodec.scalar("m", arrayOf(EValue.from(5L))))
        assertEquals(6L, EtCodec.scalar("m", arrayOf(EValue.from(Tensor.fromBlob(longArrayOf(6), longArrayOf(1))))))
        try { EtCodec.scalar("m", arrayOf(EValue.from(1.5))); fail() } catch (e: ProgramMismatchException) { }
    }

    @Test fun eosIdsAsIntsOrTensor() {
        assertEquals(listOf(2L, 0L), EtCodec.longList("get_eos_ids", arrayOf(EValue.from(2L), EValue.from(0L))))
        assertEquals(listOf(2L, 0L), EtCodec.longList("get_eos_ids",
            arrayOf(EValue.from(Tensor.fromBlob(longArrayOf(2, 0), longArrayOf(2))))))
        try { EtCodec.longList("get_eos_ids", arrayOf(EValue.from(Tensor.fromBlob(FloatArray(2), longArrayOf(2))))); fail() }
        catch (e: ProgramMismatchException) { }
    }

    @Test fun forwardOutputIsValidated() {
        val stats = EValue.from(Tensor.fromBlob(FloatArray(8) { it.toFloat() }, longArrayOf(8)))
        val ok = EtCodec.forwardOutput(arrayOf(EValue.from(Tensor.fromBlob(FloatArray(5) { it * 1f }, longArrayOf(1, 5))), stats), 5)
        assertEquals(4f, ok.logits[4])
        assertEquals(7L, ok.kvStats.tokensCached)
        assertEquals(2.0, ok.kvStats.avgBitsPerElement, 0.0)
        val bad = listOf(
            arrayOf(EValue.from(Tensor.fromBlob(FloatArray(5), longArrayOf(5))), stats),                 // rank 1 logits
            arrayOf(EValue.from(Tensor.fromBlob(FloatArray(6), longArrayOf(1, 6))), stats),              // wrong vocab
            arrayOf(EValue.from(Tensor.fromBlob(IntArray(5), longArrayOf(1, 5))), stats),                // int logits
            arrayOf(EValue.from(Tensor.fromBlob(FloatArray(5), longArrayOf(1, 5)))),                     // no stats
            arrayOf(EValue.from(Tensor.fromBlob(FloatArray(5), longArrayOf(1, 5))),
                EValue.from(Tensor.fromBlob(FloatArray(7), longArrayOf(7)))),                                // short stats
        )
        for (b in bad) try { EtCodec.forwardOutput(b, 5); fail("accepted ${b.size}") } catch (e: ProgramMismatchException) { }
    }
}

class ExecuTorchBackendTest {
    @Test fun readsMetadataAndRunsForward() {
        var opened = 0
        val runners = ArrayList<FakeRunner>()
        val be = ExecuTorchBackend({ opened++; FakeRunner().also { runners.add(it) } })
        assertEquals(16, be.meta.maxContextLen); assertEquals(4, be.meta.maxSeqLen); assertEquals(10, be.meta.vocabSize)
        assertEquals(setOf(2), be.meta.eosIds)
        val out = be.forward(intArrayOf(1, 5), 3)
        assertEquals(6, Sampler.argmax(out.logits))
        assertEquals(5L, out.kvStats.tokensCached)
        val inp = runners[0].inputs.single()
        assertArrayEquals(longArrayOf(1, 2), inp[0].toTensor().shape())
        assertArrayEquals(longArrayOf(3), inp[1].toTensor().dataAsLongArray)
        be.reset()
        assertEquals(2, opened)
        assertTrue(runners[0].closed)
        try { be.forward(IntArray(5), 0); fail("chunk > max_seq_len accepted") } catch (e: IllegalArgumentException) { }
        try { be.forward(IntArray(1), 16); fail("position beyond context accepted") } catch (e: IllegalArgumentException) { }
    }

    @Test fun decodeLoopOverTheAdapter() {
        val be = ExecuTorchBackend({ FakeRunner() })
        val r = Generator(be, Sampler()).generate(intArrayOf(1, 3, 4, 5, 6, 7), 0, 100)
        // 7 -> 8 -> 9 -> 0 -> 1 -> 2 (eos)
        assertEquals(listOf(8, 9, 0, 1), r.tokens)
        assertEquals(StopReason.EOS, r.stopReason)
    }

    @Test fun rejectsProgramsBreakingTheContract() {
        val wrongLayout = FakeRunner(metadata = mapOf("get_max_context_len" to 16L, "get_max_seq_len" to 4L, "get_vocab_size" to 10L,
            "get_bos_id" to 1L, "get_n_layers" to 2L, "get_layout_version" to 2L))
        for (r in listOf(wrongLayout, FakeRunner(names = setOf("forward")))) {
            try { ExecuTorchBackend({ r }); fail() } catch (e: ProgramMismatchException) { }
        }
        val be = ExecuTorchBackend({ FakeRunner(logitsDtype = DType.INT32) })
        try { be.forward(intArrayOf(1), 0); fail() } catch (e: ProgramMismatchException) { }
    }

    @Test fun contractMismatchIsDetected() {
        val c = ProgramContract.parse(ContractTest.sample(maxCtx = 32))
        try { ExecuTorchBackend({ FakeRunner() }, c); fail() } catch (e: ProgramMismatchException) { }
        ExecuTorchBackend({ FakeRunner() }, ProgramContract.parse(ContractTest.sample(maxCtx = 16)))
    }
}

class ContractTest {
    companion object {
        fun sample(maxCtx: Int = 16, layout: Int = 1, tokDtype: String = "int64") = """
        {"layout_version": $layout, "program": "model.pte", "ops_mode": "portable", "model": "m",
         "methods": {"forward": {"inputs": [{"name": "tokens", "dtype": "$tokDtype", "shape": [1, "T"]},
                                            {"name": "input_pos", "dtype": "int64", "shape": [1]}],
                                 "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 10]},
                                             {"name": "kv_stats", "dtype": "float32", "shape": [8]}]},
                     "get_max_context_len": {}, "get_max_seq_len": {}, "get_vocab_size": {}, "get_bos_id": {},
                     "get_n_layers": {}, "get_layout_version": {}, "get_eos_ids": {}},
         "metadata": {"get_max_context_len": $maxCtx, "get_max_seq_len": 4, "get_vocab_size": 10, "get_bos_id": 1,
                      "get_n_layers": 2, "get_layout_version": $layout, "get_eos_ids": [2]},
         "kv_stats_fields": ["kv_bytes_allocated", "kv_bytes_used", "avg_bits", "tokens_2bit", "tokens_4bit",
                             "tokens_8bit", "tokens_16bit", "tokens_cached"],
         "chat": {"format": "chatml", "default_system": "sys"}, "tokenizer": {"file": "tokenizer.json"}}
        """
    }

    @Test fun parsesAndRejects() {
        val c = ProgramContract.parse(sample())
        assertEquals(16, c.meta.maxContextLen); assertEquals("sys", c.defaultSystem); assertEquals(setOf(2), c.meta.eosIds)
        for (bad in listOf(sample(layout = 2), sample(tokDtype = "int32"))) {
            try { ProgramContract.parse(bad); fail() } catch (e: IllegalArgumentException) { }
        }
    }

    /** The contract `kvexport bundle` wrote (path from -Dkvexport.contract), when the harness provides one. */
    @Test fun bundledContractIsAccepted() {
        val p = System.getProperty("kvexport.contract")
        assumeTrue("no -Dkvexport.contract given", p != null)
        val c = ProgramContract.parse(File(p!!).readText())
        assertEquals(ProgramContract.LAYOUT_VERSION, c.layoutVersion)
        assertTrue(File(File(p).parentFile, c.program).isFile)
    }
}
