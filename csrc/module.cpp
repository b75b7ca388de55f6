// The Python module riskpo_kernels._C. Importing it runs the static
// TORCH_LIBRARY_IMPL registrations of the kernels; the module itself only
// says how it was built. Plain CPython API: no pybind11 to compile.
#include <Python.h>

static struct PyModuleDef riskpo_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "riskpo_kernels compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&riskpo_module);
  if (module == nullptr) return nullptr;
#if defined(RISKPO_WITH_CUDA)
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
