package org.kvexport.demo.core

data class ChatMessage(val role: String, val content: String)

/**
 * ChatML as SmolLM2's chat_template.jinja renders it:
 *   `<|im_start|>role\ncontent<|im_end|>\n` per message, a default system
 *   message when the conversation does not start with one, and
 *   `<|im_start|>assistant\n` as generation prompt.
 * The bundler (kvexport/android/bundle.py) checks that the program's jinja
 * template renders exactly like this and stores the default system text.
 */
class ChatTemplate(val defaultSystem: String?) {
    fun render(messages: List<ChatMessage>, addGenerationPrompt: Boolean = true): String {
        val sb = StringBuilder()
        if (defaultSystem != null && (messages.isEmpty() || messages[0].role != "system")) {
            if (messages.isNotEmpty()) sb.append(START).append("system\n").append(defaultSystem).append(END).append('\n')
        }
        for (m in messages) sb.append(START).append(m.role).append('\n').append(m.content).append(END).append('\n')
        if (addGenerationPrompt) sb.append(START).append("assistant\n")
        return sb.toString()
    }

    companion object {
        const val START = "<|im_start|>"
        const val END = "<|im_end|>"
    }
}
