package org.kvexport.demo.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class JsonTest {
    @Test fun parsesAndWritesRoundTrip() {
        val v = Json.parse("""{"a": [1, -2.5, true, null, "x\u00e9\ud83d\ude00\n"], "b": {}}""").asMap("root")
        val a = v["a"].asList("a")
        assertEquals(1L, a[0]); assertEquals(-2.5, a[1]); assertEquals(true, a[2]); assertEquals(null, a[3])
        assertEquals("xé😀\n", a[4])
        assertEquals(v, Json.parse(Json.write(v)))
    }

    @Test fun rejectsGarbage() {
        for (bad in listOf("{", "[1,]x", "{\"a\" 1}", "tru", "\"abc")) {
            try { Json.parse(bad); fail("accepted $bad") } catch (e: IllegalArgumentException) { }
        }
    }
}

class ByteLevelTest {
    @Test fun gpt2SplitRules() {
        assertEquals(listOf("Hello", " world"), ByteLevel.split("Hello world"))
        assertEquals(listOf(" ", " two", " ", " spaces", "\n", "\n", "nl"), ByteLevel.split("  two  spaces\n\nnl"))
        assertEquals(listOf("I", "'m", " 42", "!!", "    "), ByteLevel.split("I'm 42!!    "))
        assertEquals(listOf("def", " f", "(", "x", "):", "\n   ", " return"), ByteLevel.split("def f(x):\n    return"))
        assertEquals(listOf("日本語", " 😀", " ok"), ByteLevel.split("日本語 😀 ok"))
    }

    @Test fun byteMapIsABijection() {
        val s = (0 until 256).map { ByteLevel.byteToChar[it] }.toSet()
        assertEquals(256, s.size)
        assertEquals('Ġ', ByteLevel.byteToChar[' '.code])
        assertEquals('Ċ', ByteLevel.byteToChar['\n'.code])
        assertArrayEquals("é😀".toByteArray(), ByteLevel.decodeChars(ByteLevel.encodeBytes("é😀")))
    }

    @Test fun utf8LossyLikeRust() {
        fun b(vararg x: Int) = ByteArray(x.size) { x[it].toByte() }
        assertEquals("\uFFFD", Utf8.decodeLossy(b(0xF0, 0x9F, 0x98)))
        assertEquals("a\uFFFD", Utf8.decodeLossy(b(0x61, 0xC3)))
        assertEquals("\uFFFD(\uFFFD", Utf8.decodeLossy(b(0xE2, 0x28, 0xA1)))
        assertEquals("\uFFFD\uFFFD", Utf8.decodeLossy(b(0xC0, 0x80)))
        assertEquals("😀", Utf8.decodeLossy(b(0xF0, 0x9F, 0x98, 0x80)))
        assertEquals(null, Utf8.decodeStrict(b(0xFF)))
    }
}

class BpeTokenizerTest {
    private val tok = TestTokenizers.tiny
    private val hell = 258
    private val gwor = 261

    @Test fun appliesMergesByRank() {
        assertArrayEquals(intArrayOf(hell, 'o'.code), tok.encode("hello"))
        val w = intArrayOf(hell, 'o'.code, gwor, 'l'.code, 'd'.code)
        assertArrayEquals(w, tok.encode("hello world"))
        assertEquals("hello world", tok.decode(w))
    }

    @Test fun splitsAddedTokensFirstAndSkipsSpecialsOnDecode() {
        val ids = tok.encode("<|im_start|>user\nhello<|im_end|>\n")
        assertEquals(TestTokenizers.IM_START, ids[0])
        assertTrue(ids.contains(TestTokenizers.IM_END))
        assertEquals("user\nhello\n", tok.decode(ids))
        assertEquals("<|im_start|>user\nhello<|im_end|>\n", tok.decode(ids, skipSpecialTokens = false))
    }

    @Test fun templateProcessingAddsBos() {
        assertArrayEquals(intArrayOf(TestTokenizers.IM_START, hell, 'o'.code), tok.encode("hello", addSpecialTokens = true))
    }

    @Test fun bytesRoundTripForAnyText() {
        for (s in listOf("", " ", "a  b\t\tc\r\n", "émoji 😀👍🏽", "数字 123 ٣", "x**2 != y;")) {
            assertEquals(s, tok.decode(tok.encode(s)))
        }
    }

    @Test fun streamDecoderHoldsIncompleteUtf8() {
        val ids = "😀".toByteArray().map { it.toInt() and 0xff }  // byte tokens have id == byte here
        val sd = StreamDecoder(tok)
        assertEquals(listOf("", "", "", "😀"), ids.map { sd.push(it) })
        assertEquals(" ok", listOf(' '.code, 'o'.code, 'k'.code).joinToString("") { sd.push(it) })
    }
}

class SamplerTest {
    @Test fun greedyIsArgmaxFirstOnTies() {
        assertEquals(2, Sampler().sample(floatArrayOf(0f, 1f, 3f, 3f)))
    }

    @Test fun tinyTopPKeepsOnlyTheBestToken() {
        val s = Sampler(temperature = 5f, topP = 0.01f, seed = 1)
        repeat(200) { assertEquals(1, s.sample(floatArrayOf(0f, 0.5f, 0.1f))) }
    }

    @Test fun temperatureSamplingFollowsSoftmax() {
        val s = Sampler(temperature = 1f, topP = 1f, seed = 7)
        val n = 20000
        val c = IntArray(2)
        repeat(n) { c[s.sample(floatArrayOf(0f, Math.log(3.0).toFloat()))]++ }
        assertEquals(0.75, c[1].toDouble() / n, 0.02)
    }

    @Test fun topPDropsTheTail() {
        // probs 0.5, 0.3, 0.2 -> top-p 0.7 keeps {0, 1}; token 2 must never appear
        val l = floatArrayOf(Math.log(0.5).toFloat(), Math.log(0.3).toFloat(), Math.log(0.2).toFloat())
        val s = Sampler(temperature = 1f, topP = 0.7f, seed = 3)
        val seen = HashSet<Int>()
        repeat(2000) { seen.add(s.sample(l)) }
        assertEquals(setOf(0, 1), seen)
    }
}

class ChatTemplateTest {
    @Test fun rendersChatMlLikeSmolLm2() {
        val t = ChatTemplate("You are helpful")
        assertEquals(
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            t.render(listOf(ChatMessage("user", "Hi"))),
        )
        assertEquals(
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
            t.render(listOf(ChatMessage("system", "S"), ChatMessage("user", "Hi")), addGenerationPrompt = false),
        )
    }
}

/** Scripted backend: logits are one-hot on script[call index]; records every call. */
class FakeBackend(override val meta: ProgramMeta, private val script: List<Int>) : LlmBackend {
    val calls = ArrayList<Pair<List<Int>, Int>>()
    var resets = 0
    override fun forward(tokens: IntArray, startPos: Int): StepOutput {
        calls.add(tokens.toList() to startPos)
        val l = FloatArray(meta.vocabSize) { -1f }
        l[script[minOf(calls.size - 1, script.size - 1)]] = 5f
        val n = (startPos + tokens.size).toFloat()
        return StepOutput(l, KvStats.fromArray(floatArrayOf(1024f, n * 16, 4f, 0f, n, 0f, 0f, n)))
    }
    override fun reset() { resets++ }
}

class GeneratorTest {
    private fun meta(ctx: Int = 64, seq: Int = 3) = ProgramMeta(ctx, seq, 400, 1, 1, 1, setOf(2, 0))

    @Test fun chunkedPrefillThenStopAtEos() {
        val b = FakeBackend(meta(), listOf(10, 10, 10, 11, 12, 2, 13))
        val r = Generator(b, Sampler()).generate(intArrayOf(1, 2, 3, 4, 5, 6, 7), 0, 50)
        assertEquals(listOf(listOf(1, 2, 3) to 0, listOf(4, 5, 6) to 3, listOf(7) to 6, listOf(10) to 7, listOf(11) to 8, listOf(12) to 9), b.calls)
        assertEquals(listOf(10, 11, 12), r.tokens)
        assertEquals(StopReason.EOS, r.stopReason)
        assertEquals(listOf(1, 2, 3, 4, 5, 6, 7, 10, 11, 12), r.fed)
        assertEquals(10L, r.lastStats!!.tokensCached)
    }

    @Test fun maxSeqLenOnePrefillsTokenByToken() {
        val b = FakeBackend(meta(seq = 1), listOf(2))
        Generator(b, Sampler()).generate(intArrayOf(5, 6, 7), 4, 10)
        assertEquals(listOf(listOf(5) to 4, listOf(6) to 5, listOf(7) to 6), b.calls)
    }

    @Test fun stopsWhenContextIsFullWithoutFeedingBeyondIt() {
        val b = FakeBackend(meta(ctx = 10), listOf(9))
        val r = Generator(b, Sampler()).generate(IntArray(7) { 20 + it }, 0, 100)
        assertEquals(StopReason.CONTEXT_FULL, r.stopReason)
        assertTrue(b.calls.all { it.second + it.first.size <= 10 })
        assertEquals(9, b.calls.last().second)
        assertEquals(4, r.tokens.size)  // sampled after positions 6, 7, 8, 9
    }

    @Test fun rejectsPromptLongerThanContext() {
        val b = FakeBackend(meta(ctx = 8), listOf(9))
        try { Generator(b, Sampler()).generate(IntArray(6), 3, 5); fail() } catch (e: ContextOverflowException) { }
        assertTrue(b.calls.isEmpty())
    }

    @Test fun maxNewTokensAndCancel() {
        val b = FakeBackend(meta(), listOf(9))
        assertEquals(StopReason.MAX_NEW_TOKENS, Generator(b, Sampler()).generate(intArrayOf(1), 0, 3).also { assertEquals(3, it.tokens.size) }.stopReason)
        val r = Generator(FakeBackend(meta(), listOf(9)), Sampler()).generate(intArrayOf(1), 0, 30) { _, _ -> false }
        assertEquals(StopReason.CANCELLED, r.stopReason)
        assertEquals(1, r.tokens.size)
    }
}

/** Replies by the last input token: '\n' -> "hell", "hell" -> "o", "o" -> <|im_end|>. */
class EchoBackend(override val meta: ProgramMeta) : LlmBackend {
    val calls = ArrayList<Pair<List<Int>, Int>>()
    var resets = 0
    override fun forward(tokens: IntArray, startPos: Int): StepOutput {
        calls.add(tokens.toList() to startPos)
        val next = when (tokens.last()) { '\n'.code -> 258; 258 -> 'o'.code; 'o'.code -> TestTokenizers.IM_END; else -> 'x'.code }
        val l = FloatArray(meta.vocabSize); l[next] = 1f
        return StepOutput(l, KvStats.fromArray(FloatArray(8)))
    }
    override fun reset() { resets++ }
}

class ChatSessionTest {
    private val meta = ProgramMeta(512, 4, 400, 300, 1, 1, setOf(TestTokenizers.IM_END))

    @Test fun secondTurnReusesTheCachedPrefix() {
        val b = EchoBackend(meta)
        val chat = ChatSession(b, TestTokenizers.tiny, ChatTemplate("sys"), Sampler())
        val (reply, r1) = chat.send("hi", 20)
        assertEquals("hello", reply)
        assertEquals(StopReason.EOS, r1.stopReason)
        assertTrue(b.calls.all { it.first.size <= 4 })
        val pos = chat.position
        val before = b.calls.size
        chat.send("again", 1)
        assertEquals(0, b.resets)
        assertEquals(pos, b.calls[before].second)   // continued where the cache ended
        assertFalse(b.calls.drop(before).any { it.second < pos })
    }

    @Test fun divergingHistoryResetsAndPrefillsFromZero() {
        val b = EchoBackend(meta)
        val chat = ChatSession(b, TestTokenizers.tiny, ChatTemplate("sys"), Sampler())
        chat.send("hi", 20)
        chat.messages[chat.messages.size - 1] = ChatMessage("assistant", "edited")
        val before = b.calls.size
        chat.send("again", 1)
        assertEquals(1, b.resets)
        assertEquals(0, b.calls[before].second)
    }
}
