package org.kvexport.demo.et

import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module

/** [MethodRunner] over `org.pytorch.executorch.Module` (needs the native runtime: device only). */
class ModuleRunner(path: String) : MethodRunner {
    private val module: Module = Module.load(path, Module.LOAD_MODE_MMAP)

    override fun methodNames(): Set<String> = module.methods.toSet()

    override fun execute(method: String, inputs: Array<EValue>): Array<EValue> = module.execute(method, *inputs)

    override fun close() = module.destroy()
}
