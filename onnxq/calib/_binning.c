/* One-pass |x| histogram binning for onnxq.calib.histogram (a speed path; histogram.py holds the
 * numpy reference that defines the result, and the tests check both give identical counts).
 *
 *   zeros = bin_abs_f32(values, scale, counts)
 *
 * values: a C-contiguous float32 buffer with no NaN, Inf or value whose bin would pass the end
 *         (the caller has checked min/max). scale: 2**-exponent, a power of two, so |x| * scale is
 *         exact in float32 and truncation is floor. counts: a writable C-contiguous int64 buffer of
 *         num_bins entries; bin k gains #{x : floor(|x| * scale) == k}, exact zeros included (the
 *         caller moves them out of bin 0 with the returned count).
 *
 * numpy needs seven passes for this (abs, zero count, multiply, cast, and bincount's cast, min/max
 * and count); here it is one read of the values. Four interleaved 32-bit sub-histograms keep
 * consecutive equal bins (ReLU outputs are often long runs of bin 0) from serialising on one memory
 * location; they are flushed into the int64 counts every BLOCK values so they cannot overflow.
 * Raises ValueError (without touching counts) if a value (or a NaN) falls past the last bin.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 4
#define BLOCK ((Py_ssize_t)1 << 28) /* < 2**32 / LANES values per lane between flushes */
#define STAGE 8192                  /* bin indices computed ahead, 32 KiB on the stack */

/* Bins values[0..n) into the lanes (LANES arrays of num_bins + 1 counters; the extra one collects
 * anything at or past the last bin, NaN included, so no index is ever out of bounds). Two loops per
 * stage: a branch-free one the compiler vectorises (|x| * scale clamped, truncated, exact zeros
 * counted) and the scatter into the lanes. */
static void bin_block(const float *values, Py_ssize_t n, float scale, Py_ssize_t num_bins,
                      uint32_t *lanes, Py_ssize_t *zeros)
{
    int32_t index[STAGE];
    const float last = (float)num_bins;
    Py_ssize_t stride = num_bins + 1, zero = 0;
    uint32_t *lane0 = lanes, *lane1 = lanes + stride, *lane2 = lanes + 2 * stride, *lane3 = lanes + 3 * stride;
    for (Py_ssize_t start = 0; start < n; start += STAGE) {
        Py_ssize_t size = n - start < STAGE ? n - start : STAGE, i = 0;
        const float *part = values + start;
        for (i = 0; i < size; i++) {
            float scaled = fabsf(part[i]) * scale;
            index[i] = (int32_t)(scaled < last ? scaled : last); /* NaN compares false: -> last */
            zero += part[i] == 0.0f;
        }
        for (i = 0; i + LANES <= size; i += LANES) {
            lane0[index[i]]++;
            lane1[index[i + 1]]++;
            lane2[index[i + 2]]++;
            lane3[index[i + 3]]++;
        }
        for (; i < size; i++)
            lane0[index[i]]++;
    }
    *zeros += zero;
}

static PyObject *bin_abs_f32(PyObject *self, PyObject *args)
{
    Py_buffer values, counts;
    float scale;
    if (!PyArg_ParseTuple(args, "y*fw*", &values, &scale, &counts))
        return NULL;
    PyObject *result = NULL;
    uint32_t *lanes = NULL;
    uint64_t past_end = 0;
    int64_t *out = NULL;
    Py_ssize_t num_bins = counts.len / (Py_ssize_t)sizeof(int64_t), zeros = 0;
    if (values.len % (Py_ssize_t)sizeof(float) || counts.len % (Py_ssize_t)sizeof(int64_t) || num_bins == 0) {
        PyErr_SetString(PyExc_ValueError, "bin_abs_f32 needs float32 values and a non-empty int64 counts buffer");
        goto done;
    }
    lanes = calloc((size_t)(LANES * (num_bins + 1)), sizeof(uint32_t));
    out = calloc((size_t)num_bins, sizeof(int64_t));
    if (lanes == NULL || out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const float *data = (const float *)values.buf;
    Py_ssize_t n = values.len / (Py_ssize_t)sizeof(float);
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t stride = num_bins + 1;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        Py_ssize_t size = n - start < BLOCK ? n - start : BLOCK;
        bin_block(data + start, size, scale, num_bins, lanes, &zeros);
        for (Py_ssize_t k = 0; k < num_bins; k++)
            out[k] += (int64_t)lanes[k] + lanes[stride + k] + lanes[2 * stride + k] + lanes[3 * stride + k];
        for (int lane = 0; lane < LANES; lane++)
            past_end += lanes[lane * stride + num_bins];
        memset(lanes, 0, (size_t)(LANES * stride) * sizeof(uint32_t));
    }
    Py_END_ALLOW_THREADS
    if (past_end != 0) {
        PyErr_SetString(PyExc_ValueError, "a value fell past the last histogram bin");
        goto done;
    }
    int64_t *target = (int64_t *)counts.buf;
    for (Py_ssize_t k = 0; k < num_bins; k++)
        target[k] += out[k];
    result = PyLong_FromSsize_t(zeros);
done:
    free(lanes);
    free(out);
    PyBuffer_Release(&values);
    PyBuffer_Release(&counts);
    return result;
}

static PyMethodDef methods[] = {
    {"bin_abs_f32", bin_abs_f32, METH_VARARGS, "zeros = bin_abs_f32(float32 values, scale, int64 counts)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_binning", NULL, -1, methods};

PyMODINIT_FUNC PyInit__binning(void) { return PyModule_Create(&module); }
