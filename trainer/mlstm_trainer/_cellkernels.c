/* Fused float32 CPU kernels for the mLSTM cell's pointwise work (see cell.py for why).
 *
 * Each function takes raw data pointers (Python ints from Tensor.data_ptr()) and row strides in
 * elements; cell.py checks dtype, device, shapes and strides before calling.  Every kernel is
 * one pass over its rows, single-threaded (the work is small next to the step's matmuls), written so
 * that GCC vectorises the inner loops: exp is a polynomial (Cephes' expf) instead of a libm call, which
 * GCC cannot vectorise without -ffast-math.
 * The GIL is released while a kernel runs.
 *
 * Gate layout along 4H is i, f, o, u (as in recurrence.py); i, f, o are sigmoids and u is a tanh.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* exp(x) for float32 (Cephes' expf polynomial), max relative error about 2 ulp; inputs are clamped to
 * the range where the result is a normal float.  Rounding to n = round(x / ln 2) adds 1.5 * 2^23 so the
 * integer lands in the low mantissa bits: no float-int conversion, no branch, so it vectorises.  NaN in
 * gives NaN out, so a diverging run still shows NaN instead of a silently clamped value. */
static inline float exp_poly(float x) {
    const float hi = 88.3762626647949f, lo = -87.33654475f, magic = 12582912.0f;
    float xc = x < hi ? x : hi;
    xc = xc > lo ? xc : lo;
    union { float f; int32_t i; } rounded = {xc * 1.44269504088896341f + magic};
    float n = rounded.f - magic;
    float r = xc - n * 0.693359375f; /* ln 2 in two parts keeps r exact */
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = (rounded.i - 0x4B400000 + 127) << 23; /* 2^n: the low bits of rounded hold n */
    float y = p * scale.f;
    return x == x ? y : x;
}

static inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

/* tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 exactly and stays within 1e-7 absolute near 0. */
static inline float tanh_f(float x) { return 1.0f - 2.0f / (exp_poly(2.0f * x) + 1.0f); }

/* One row of the forward: c = f*c_prev + i*u, tanh_c = tanh(c), h = o*tanh_c, c_next = c*k.  A
 * function of its own with restrict arguments: inlined in the row loop, GCC did not vectorise it. */
static inline void cell_state(Py_ssize_t hidden, float k, const float *restrict g, const float *restrict cp,
                              float *restrict cn, float *restrict tc, float *restrict h) {
    const float *gi = g, *gf = g + hidden, *go = g + 2 * hidden, *gu = g + 3 * hidden;
    for (Py_ssize_t j = 0; j < hidden; j++) {
        float c = gf[j] * cp[j] + gi[j] * gu[j];
        float t = tanh_f(c);
        tc[j] = t;
        h[j] = go[j] * t;
        cn[j] = c * k;
    }
}

/* One row of the backward: dz (4H) from dL/dh_t, and dc replaced by dL/dc_{t-1}. */
static inline void cell_grad(Py_ssize_t hidden, float k, const float *restrict dh, const float *restrict gh,
                             const float *restrict g, const float *restrict tc, const float *restrict cp,
                             float *restrict dc, float *restrict dz) {
    const float *gi = g, *gf = g + hidden, *go = g + 2 * hidden, *gu = g + 3 * hidden;
    float *di = dz, *df = dz + hidden, *dout = dz + 2 * hidden, *du = dz + 3 * hidden;
    for (Py_ssize_t j = 0; j < hidden; j++) {
        float h_grad = dh[j] * k + gh[j];
        float i = gi[j], f = gf[j], o = go[j], u = gu[j], t = tc[j];
        float c_grad = dc[j] * k + h_grad * o * (1.0f - t * t);
        dout[j] = h_grad * t * o * (1.0f - o);
        di[j] = c_grad * u * i * (1.0f - i);
        df[j] = c_grad * cp[j] * f * (1.0f - f);
        du[j] = c_grad * i * (1.0f - u * u);
        dc[j] = c_grad * f;
    }
}

typedef struct {
    float *ptr;
    Py_ssize_t stride; /* elements between rows */
} rows_t;

/* The row loops are built twice, for AVX2+FMA and for baseline x86-64, and the loader picks one per
 * machine (GCC function multi-versioning): measured 2-3x faster for the exp-heavy loops, while the
 * package still installs and runs on any x86-64.  Other architectures get the one generic build. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* gates = act(z) (i, f, o sigmoid; u tanh); c = f*c_prev + i*u; tanh_c = tanh(c); h = o*tanh_c.  With
 * keep (the next step's per-row keep factor), c_next = c*keep and h_reset = h*keep; else c_next = c. */
MULTIVERSION
static void forward_rows(Py_ssize_t batch, Py_ssize_t hidden, const rows_t *r) {
    const rows_t z = r[0], c_prev = r[1], gates = r[2], c_next = r[3], tanh_c = r[4], h = r[5];
    const rows_t keep = r[6], h_reset = r[7];
    for (Py_ssize_t b = 0; b < batch; b++) {
        const float *restrict zr = z.ptr + b * z.stride, *restrict cp = c_prev.ptr + b * c_prev.stride;
        float *restrict g = gates.ptr + b * gates.stride, *restrict cn = c_next.ptr + b * c_next.stride;
        float *restrict tc = tanh_c.ptr + b * tanh_c.stride, *restrict hr = h.ptr + b * h.stride;
        for (Py_ssize_t j = 0; j < 3 * hidden; j++) g[j] = sigmoid_f(zr[j]);
        for (Py_ssize_t j = 3 * hidden; j < 4 * hidden; j++) g[j] = tanh_f(zr[j]);
        const float k = keep.ptr ? keep.ptr[b * keep.stride] : 1.0f;
        cell_state(hidden, k, g, cp, cn, tc, hr);
        if (keep.ptr) {
            float *restrict hz = h_reset.ptr + b * h_reset.stride;
            for (Py_ssize_t j = 0; j < hidden; j++) hz[j] = hr[j] * k;
        }
    }
}

/* dL/dh_t and dL/dc_t arrive scaled by k (the keep factor of step t+1); gh is dL/dh_t from the outputs.
 * Writes dz (4H, the pre-activation gradient) and replaces dc by dL/dc_{t-1}. */
MULTIVERSION
static void backward_rows(Py_ssize_t batch, Py_ssize_t hidden, const rows_t *r) {
    const rows_t dh = r[0], grad_h = r[1], scale = r[2], gates = r[3], tanh_c = r[4], c_prev = r[5];
    const rows_t dc = r[6], dz = r[7];
    for (Py_ssize_t b = 0; b < batch; b++) {
        const float k = scale.ptr ? scale.ptr[b * scale.stride] : 1.0f;
        const float *restrict dhr = dh.ptr + b * dh.stride, *restrict gh = grad_h.ptr + b * grad_h.stride;
        const float *restrict g = gates.ptr + b * gates.stride, *restrict tc = tanh_c.ptr + b * tanh_c.stride;
        const float *restrict cp = c_prev.ptr + b * c_prev.stride;
        float *restrict dcr = dc.ptr + b * dc.stride, *restrict d = dz.ptr + b * dz.stride;
        cell_grad(hidden, k, dhr, gh, g, tc, cp, dcr, d);
    }
}


/* Every kernel takes (batch, width) and then n (pointer, row stride) pairs: parses them into rows[].
 * A pointer of 0 is NULL (an absent keep/scale column, whose stride is then per row, not per element). */
static int parse_call(PyObject *const *args, Py_ssize_t nargs, const char *name, int n, Py_ssize_t *batch,
                      Py_ssize_t *width, rows_t *rows) {
    if (nargs != 2 + 2 * n) {
        PyErr_Format(PyExc_TypeError, "%s takes %d arguments (%zd given)", name, 2 + 2 * n, nargs);
        return -1;
    }
    *batch = PyLong_AsSsize_t(args[0]);
    *width = PyLong_AsSsize_t(args[1]);
    for (int i = 0; i < n && !PyErr_Occurred(); i++) {
        rows[i].ptr = (float *)PyLong_AsVoidPtr(args[2 + 2 * i]);
        rows[i].stride = PyLong_AsSsize_t(args[3 + 2 * i]);
    }
    return PyErr_Occurred() ? -1 : 0;
}

/* Parses (batch, width, n x (pointer, row stride)) and runs a row kernel with the GIL released. */
static PyObject *call_rows(PyObject *const *args, Py_ssize_t nargs, const char *name, int n,
                           void (*kernel)(Py_ssize_t, Py_ssize_t, const rows_t *)) {
    Py_ssize_t batch, width;
    rows_t r[8];
    if (parse_call(args, nargs, name, n, &batch, &width, r) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    kernel(batch, width, r);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* out = a * b, row by row (rows: out, a, b). */
static void mul_rows(Py_ssize_t batch, Py_ssize_t width, const rows_t *r) {
    for (Py_ssize_t b = 0; b < batch; b++) {
        float *o = r[0].ptr + b * r[0].stride;
        const float *x = r[1].ptr + b * r[1].stride, *y = r[2].ptr + b * r[2].stride;
        for (Py_ssize_t j = 0; j < width; j++) o[j] = x[j] * y[j];
    }
}

/* out_a = grad * a and out_b = grad * b in one pass over grad (rows: grad, a, out_a, b, out_b). */
static void mul2_rows(Py_ssize_t batch, Py_ssize_t width, const rows_t *r) {
    for (Py_ssize_t b = 0; b < batch; b++) {
        const float *g = r[0].ptr + b * r[0].stride;
        const float *x = r[1].ptr + b * r[1].stride, *y = r[3].ptr + b * r[3].stride;
        float *ox = r[2].ptr + b * r[2].stride, *oy = r[4].ptr + b * r[4].stride;
        for (Py_ssize_t j = 0; j < width; j++) {
            ox[j] = g[j] * x[j];
            oy[j] = g[j] * y[j];
        }
    }
}

/* forward_cell(batch, hidden, z, c_prev, gates, c_next, tanh_c, h, keep, h_reset), each tensor given as
 * (pointer, row stride): forward_rows.  keep is the next step's [B, 1] column, pointer 0 for none. */
static PyObject *forward_cell(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return call_rows(args, nargs, "forward_cell", 8, forward_rows);
}

/* backward_cell(batch, hidden, dh, grad_h, scale, gates, tanh_c, c_prev, dc, dz): backward_rows.
 * scale pointer 0 means 1; grad_h must be given (the caller passes zeros when there is none). */
static PyObject *backward_cell(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return call_rows(args, nargs, "backward_cell", 8, backward_rows);
}

/* mul(batch, width, out, a, b): mul_rows. */
static PyObject *mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return call_rows(args, nargs, "mul", 3, mul_rows);
}

/* mul2(batch, width, grad, a, out_a, b, out_b): mul2_rows (the two halves of d(xm * mh)). */
static PyObject *mul2(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return call_rows(args, nargs, "mul2", 5, mul2_rows);
}

static PyMethodDef methods[] = {
    {"forward_cell", (PyCFunction)(void (*)(void))forward_cell, METH_FASTCALL, "Fused forward cell."},
    {"backward_cell", (PyCFunction)(void (*)(void))backward_cell, METH_FASTCALL, "Fused backward cell."},
    {"mul", (PyCFunction)(void (*)(void))mul, METH_FASTCALL, "Row-wise product."},
    {"mul2", (PyCFunction)(void (*)(void))mul2, METH_FASTCALL, "Two products sharing one factor."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cellkernels", "Fused float32 CPU kernels for the mLSTM cell.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cellkernels(void) { return PyModule_Create(&module); }
