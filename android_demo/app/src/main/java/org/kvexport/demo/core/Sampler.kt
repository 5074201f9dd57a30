package org.kvexport.demo.core

import java.util.Random

/**
 * Next-token sampler: greedy (argmax, first index on ties) when
 * temperature <= 0, otherwise temperature-scaled softmax restricted to the
 * smallest set of tokens whose probability mass reaches topP (nucleus).
 */
class Sampler(val temperature: Float = 0f, val topP: Float = 1f, seed: Long = 42L) {
    private val rng = Random(seed)

    init {
        require(topP > 0f && topP <= 1f) { "topP must be in (0, 1]" }
    }

    fun sample(logits: FloatArray): Int {
        require(logits.isNotEmpty()) { "empty logits" }
        if (temperature <= 0f) return argmax(logits)
        val probs = softmax(logits, temperature)
        val order = (probs.indices).sortedByDescending { probs[it] }
        var mass = 0.0
        var keep = 0
        while (keep < order.size) {
            mass += probs[order[keep]]
            keep++
            if (mass >= topP) break
        }
        val r = rng.nextDouble() * mass
        var acc = 0.0
        for (k in 0 until keep) {
            acc += probs[order[k]]
            if (r < acc) return order[k]
        }
        return order[keep - 1]
    }

    companion object {
        fun argmax(x: FloatArray): Int {
            var best = 0
            for (i in 1 until x.size) if (x[i] > x[best]) best = i
            return best
        }

        fun softmax(logits: FloatArray, temperature: Float = 1f): DoubleArray {
            var m = Double.NEGATIVE_INFINITY
            for (v in logits) if (v > m) m = v.toDouble()
            val out = DoubleArray(logits.size)
            var sum = 0.0
            for (i in logits.indices) { out[i] = Math.exp((logits[i] - m) / temperature); sum += out[i] }
            for (i in out.indices) out[i] /= sum
            return out
        }
    }
}
