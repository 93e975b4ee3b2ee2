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
static void forward_rows(Py_ssize_t batch, Py_ssize_t hidden, rows_t z, rows_t c_prev, rows_t gates,
                         rows_t c_next, rows_t tanh_c, rows_t h, const float *keep, Py_ssize_t keep_stride,
                         rows_t h_reset) {
    for (Py_ssize_t b = 0; b < batch; b++) {
        const float *restrict zr = z.ptr + b * z.stride, *restrict cp = c_prev.ptr + b * c_prev.stride;
        float *restrict g = gates.ptr + b * gates.stride, *restrict cn = c_next.ptr + b * c_next.stride;
        float *restrict tc = tanh_c.ptr + b * tanh_c.stride, *restrict hr = h.ptr + b * h.stride;
        for (Py_ssize_t j = 0; j < 3 * hidden; j++) g[j] = sigmoid_f(zr[j]);
        for (Py_ssize_t j = 3 * hidden; j < 4 * hidden; j++) g[j] = tanh_f(zr[j]);
        const float k = keep ? keep[b * keep_stride] : 1.0f;
        cell_state(hidden, k, g, cp, cn, tc, hr);
        if (keep) {
            float *restrict hz = h_reset.ptr + b * h_reset.stride;
            for (Py_ssize_t j = 0; j < hidden; j++) hz[j] = hr[j] * k;
        }
    }
}

/* dL/dh_t and dL/dc_t arrive scaled by k (the keep factor of step t+1); gh is dL/dh_t from the outputs.
 * Writes dz (4H, the pre-activation gradient) and replaces dc by dL/dc_{t-1}. */
MULTIVERSION
static void backward_rows(Py_ssize_t batch, Py_ssize_t hidden, rows_t dh, rows_t grad_h, const float *scale,
                          Py_ssize_t scale_stride, rows_t gates, rows_t tanh_c, rows_t c_prev, rows_t dc,
                          rows_t dz) {
    for (Py_ssize_t b = 0; b < batch; b++) {
        const float k = scale ? scale[b * scale_stride] : 1.0f;
        const float *restrict dhr = dh.ptr + b * dh.stride, *restrict gh = grad_h.ptr + b * grad_h.stride;
        const float *restrict g = gates.ptr + b * gates.stride, *restrict tc = tanh_c.ptr + b * tanh_c.stride;
        const float *restrict cp = c_prev.ptr + b * c_prev.stride;
        float *restrict dcr = dc.ptr + b * dc.stride, *restrict d = dz.ptr + b * dz.stride;
        cell_grad(hidden, k, dhr, gh, g, tc, cp, dcr, d);
    }
}


static int parse_ptr(PyObject *arg, float **out) {
    *out = (float *)PyLong_AsVoidPtr(arg);
    return PyErr_Occurred() ? -1 : 0;
}

static int parse_rows(PyObject *const *args, rows_t *rows) {
    if (parse_ptr(args[0], &rows->ptr) < 0) return -1;
    rows->stride = PyLong_AsSsize_t(args[1]);
    return PyErr_Occurred() ? -1 : 0;
}

static int parse_sizes(PyObject *const *args, Py_ssize_t *batch, Py_ssize_t *width) {
    *batch = PyLong_AsSsize_t(args[0]);
    *width = PyLong_AsSsize_t(args[1]);
    return PyErr_Occurred() ? -1 : 0;
}

static int check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char *name) {
    if (nargs == expected) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, expected, nargs);
    return -1;
}

/* forward_cell(batch, hidden, z, z_rs, c_prev, cp_rs, gates, g_rs, c_next, cn_rs, tanh_c, tc_rs,
 *              h, h_rs, keep, keep_stride, h_reset, hr_rs): forward_rows; keep == 0 means none. */
static PyObject *forward_cell(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t batch, hidden, keep_stride;
    rows_t z, c_prev, gates, c_next, tanh_c, h, h_reset;
    float *keep;
    if (check_nargs(nargs, 18, "forward_cell") < 0 || parse_sizes(args, &batch, &hidden) < 0 ||
        parse_rows(args + 2, &z) < 0 || parse_rows(args + 4, &c_prev) < 0 ||
        parse_rows(args + 6, &gates) < 0 || parse_rows(args + 8, &c_next) < 0 ||
        parse_rows(args + 10, &tanh_c) < 0 || parse_rows(args + 12, &h) < 0 ||
        parse_ptr(args[14], &keep) < 0 || parse_rows(args + 16, &h_reset) < 0)
        return NULL;
    keep_stride = PyLong_AsSsize_t(args[15]);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    forward_rows(batch, hidden, z, c_prev, gates, c_next, tanh_c, h, keep, keep_stride, h_reset);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* backward_cell(batch, hidden, dh, dh_rs, grad_h, gh_rs, scale, scale_stride, gates, g_rs,
 *               tanh_c, tc_rs, c_prev, cp_rs, dc, dc_rs, dz, dz_rs): backward_rows; scale == 0 means
 *               1, and grad_h must be given (the caller passes zeros when there is none). */
static PyObject *backward_cell(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t batch, hidden, scale_stride;
    rows_t dh, grad_h, gates, tanh_c, c_prev, dc, dz;
    float *scale;
    if (check_nargs(nargs, 18, "backward_cell") < 0 || parse_sizes(args, &batch, &hidden) < 0 ||
        parse_rows(args + 2, &dh) < 0 || parse_rows(args + 4, &grad_h) < 0 ||
        parse_ptr(args[6], &scale) < 0 || parse_rows(args + 8, &gates) < 0 ||
        parse_rows(args + 10, &tanh_c) < 0 || parse_rows(args + 12, &c_prev) < 0 ||
        parse_rows(args + 14, &dc) < 0 || parse_rows(args + 16, &dz) < 0)
        return NULL;
    scale_stride = PyLong_AsSsize_t(args[7]);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    backward_rows(batch, hidden, dh, grad_h, scale, scale_stride, gates, tanh_c, c_prev, dc, dz);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* mul(batch, width, out, out_rs, a, a_rs, b, b_rs): out = a * b, row by row. */
static PyObject *mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t batch, width;
    rows_t out, a, b;
    if (check_nargs(nargs, 8, "mul") < 0 || parse_sizes(args, &batch, &width) < 0 ||
        parse_rows(args + 2, &out) < 0 || parse_rows(args + 4, &a) < 0 || parse_rows(args + 6, &b) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < batch; r++) {
        float *o = out.ptr + r * out.stride;
        const float *x = a.ptr + r * a.stride, *y = b.ptr + r * b.stride;
        for (Py_ssize_t j = 0; j < width; j++) o[j] = x[j] * y[j];
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* mul2(batch, width, grad, g_rs, a, a_rs, out_a, oa_rs, b, b_rs, out_b, ob_rs):
 * out_a = grad * a and out_b = grad * b in one pass over grad (the two halves of d(xm * mh)). */
static PyObject *mul2(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t batch, width;
    rows_t grad, a, out_a, b, out_b;
    if (check_nargs(nargs, 12, "mul2") < 0 || parse_sizes(args, &batch, &width) < 0 ||
        parse_rows(args + 2, &grad) < 0 || parse_rows(args + 4, &a) < 0 ||
        parse_rows(args + 6, &out_a) < 0 || parse_rows(args + 8, &b) < 0 ||
        parse_rows(args + 10, &out_b) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < batch; r++) {
        const float *g = grad.ptr + r * grad.stride;
        const float *x = a.ptr + r * a.stride, *y = b.ptr + r * b.stride;
        float *ox = out_a.ptr + r * out_a.stride, *oy = out_b.ptr + r * out_b.stride;
        for (Py_ssize_t j = 0; j < width; j++) {
            ox[j] = g[j] * x[j];
            oy[j] = g[j] * y[j];
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
};

PyMODINIT_FUNC PyInit__cellkernels(void) { return PyModule_Create(&module); }
