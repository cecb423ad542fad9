// Makes libra_kernels._C importable as a Python module. The operators themselves are registered by the
// static TORCH_LIBRARY blocks of the other translation units when the library is loaded.
#include <Python.h>

static struct PyModuleDef libra_module = {PyModuleDef_HEAD_INIT, "_C", "Libra C++ operators (torch.ops.libra)", -1,
                                          nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&libra_module); }
