package org.kvexport.demo.et

import org.kvexport.demo.core.KvStats
import org.kvexport.demo.core.LlmBackend
import org.kvexport.demo.core.ProgramContract
import org.kvexport.demo.core.ProgramMeta
import org.kvexport.demo.core.StepOutput
import org.pytorch.executorch.DType
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Tensor

/** Something that executes methods of a loaded program (the ExecuTorch Module, or a test double). */
interface MethodRunner : AutoCloseable {
    fun methodNames(): Set<String>
    fun execute(method: String, inputs: Array<EValue>): Array<EValue>
}

class ProgramMismatchException(msg: String) : IllegalStateException(msg)

/** Conversions between our contract and ExecuTorch's Java Tensor/EValue. */
object EtCodec {
    fun tokens(ids: IntArray): EValue =
        EValue.from(Tensor.fromBlob(LongArray(ids.size) { ids[it].toLong() }, longArrayOf(1, ids.size.toLong())))

    fun position(pos: Int): EValue = EValue.from(Tensor.fromBlob(longArrayOf(pos.toLong()), longArrayOf(1)))

    /** An int64 scalar returned by a metadata method (an Int EValue, or a 1-element int tensor). */
    fun scalar(method: String, out: Array<EValue>): Long {
        if (out.size != 1) throw ProgramMismatchException("$method returned ${out.size} values, expected 1")
        return toLong(method, out[0])
    }

    fun toLong(method: String, v: EValue): Long = when {
        v.isInt -> v.toInt()
        v.isTensor -> {
            val t = v.toTensor()
            if (t.numel() != 1L) throw ProgramMismatchException("$method returned a tensor of ${t.numel()} elements")
            when (t.dtype()) {
                DType.INT64 -> t.dataAsLongArray[0]
                DType.INT32 -> t.dataAsIntArray[0].toLong()
                else -> throw ProgramMismatchException("$method returned a ${t.dtype()} tensor")
            }
        }
        else -> throw ProgramMismatchException("$method returned a non-integer value")
    }

    /** A list of ints: several Int EValues (ExecuTorch constant-method lists) or one int tensor. */
    fun longList(method: String, out: Array<EValue>): List<Long> {
        if (out.size == 1 && out[0].isTensor) {
            val t = out[0].toTensor()
            return when (t.dtype()) {
                DType.INT64 -> t.dataAsLongArray.toList()
                DType.INT32 -> t.dataAsIntArray.map { it.toLong() }
                else -> throw ProgramMismatchException("$method returned a ${t.dtype()} tensor")
            }
        }
        return out.map { toLong(method, it) }
    }

    fun forwardOutput(out: Array<EValue>, vocab: Int): StepOutput {
        if (out.size != 2) throw ProgramMismatchException("forward returned ${out.size} values, expected (logits, kv_stats)")
        if (!out[0].isTensor || !out[1].isTensor) throw ProgramMismatchException("forward outputs must be tensors")
        val logits = out[0].toTensor()
        val stats = out[1].toTensor()
        if (logits.dtype() != DType.FLOAT) throw ProgramMismatchException("logits dtype ${logits.dtype()}, expected FLOAT")
        if (stats.dtype() != DType.FLOAT) throw ProgramMismatchException("kv_stats dtype ${stats.dtype()}, expected FLOAT")
        val ls = logits.shape()
        if (!(ls.size == 2 && ls[0] == 1L && ls[1] == vocab.toLong()))
            throw ProgramMismatchException("logits shape ${ls.contentToString()}, expected [1, $vocab]")
        if (!stats.shape().contentEquals(longArrayOf(KvStats.SIZE.toLong())))
            throw ProgramMismatchException("kv_stats shape ${stats.shape().contentToString()}, expected [${KvStats.SIZE}]")
        return StepOutput(logits.dataAsFloatArray, KvStats.fromArray(stats.dataAsFloatArray))
    }
}

/**
 * [LlmBackend] over an ExecuTorch program with kvexport's contract.  Reads the
 * metadata methods once (and checks them against the bundled contract when
 * given); [reset] reopens the program to drop the KV state held in its
 * mutable buffers.
 */
class ExecuTorchBackend(
    private val open: () -> MethodRunner,
    private val contract: ProgramContract? = null,
) : LlmBackend, AutoCloseable {
    private var runner: MethodRunner = open()
    override val meta: ProgramMeta

    init {
        val names = runner.methodNames()
        val missing = (listOf("forward") + ProgramContract.METADATA_METHODS).filter { it !in names }
        if (missing.isNotEmpty()) throw ProgramMismatchException("program lacks methods $missing")
        fun s(m: String) = EtCodec.scalar(m, runner.execute(m, emptyArray())).toInt()
        val eos = EtCodec.longList("get_eos_ids", runner.execute("get_eos_ids", emptyArray())).map { it.toInt() }.toSet()
        meta = ProgramMeta(s("get_max_context_len"), s("get_max_seq_len"), s("get_vocab_size"), s("get_bos_id"),
            s("get_n_layers"), s("get_layout_version"), eos)
        if (meta.layoutVersion != ProgramContract.LAYOUT_VERSION)
            throw ProgramMismatchException("program layout version ${meta.layoutVersion}, app expects ${ProgramContract.LAYOUT_VERSION}")
        if (contract != null && contract.meta != meta)
            throw ProgramMismatchException("program metadata $meta differs from io_contract.json ${contract.meta}")
    }

    override fun forward(tokens: IntArray, startPos: Int): StepOutput {
        require(tokens.size in 1..meta.maxSeqLen) { "chunk of ${tokens.size} tokens, max_seq_len is ${meta.maxSeqLen}" }
        require(startPos >= 0 && startPos + tokens.size <= meta.maxContextLen) { "positions $startPos+${tokens.size} beyond context ${meta.maxContextLen}" }
        val out = runner.execute("forward", arrayOf(EtCodec.tokens(tokens), EtCodec.position(startPos)))
        return EtCodec.forwardOutput(out, meta.vocabSize)
    }

    override fun reset() {
        runner.close()
        runner = open()
    }

    override fun close() = runner.close()
}
