"""Recurrent layers: LSTMUnit (one LSTM step) and RNN / LSTM over whole sequences.

Sequences are laid out time-major, as in Caffe: x is (T, N, ...), T timesteps of N streams,
and ``cont`` (T, N) holds the sequence-continuation indicators (0 where a new sequence begins
in that stream, 1 where it continues). The state carried into step t is multiplied by
cont[t], so a 0 resets it.

Caffe builds RNN and LSTM as an unrolled net of InnerProduct, Scale, Eltwise, TanH and LSTMUnit
layers that share their weights. Here the same formulas run as one loop over time, and the
backward pass runs back through time. The learned blobs, their shapes and their order are
those of Caffe's unrolled net, so caffemodels load unchanged. The loop sums in a different
order, which changes float32 rounding only.

Bottoms are x, cont, then optionally x_static (N, ...): an input seen at every step. With
``recurrent_param.expose_hidden`` the initial states follow them (h_0, then c_0 for LSTM, each
(1, N, H)), and the final states become extra tops. As in Caffe, no gradient crosses them:
the final states' top diffs are ignored and the initial states' bottom diffs are zero (Caffe
shares only their data with the unrolled net: "we can't backpropagate across batches").
Without ``expose_hidden``, each forward pass starts from the state the previous pass ended in
(zero at first, and zero again when N changes), as Caffe copies h_T into h_0. ``cont`` = 0
at t = 0 resets that state.
"""
from __future__ import annotations

from netengine.blob import Blob
from netengine.layers.base import Layer, register


def _sigmoid(xp, x):
    """1 / (1 + e^-x), computed through tanh so large |x| cannot overflow."""
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)


def lstm_step(xp, gates, c_prev, cont):
    """One LSTM step on (N, 4H) gate inputs ordered (i, f, o, g); returns (c, h, acts).

    i = σ(a_i), f = cont·σ(a_f), o = σ(a_o), g = tanh(a_g); c = f·c_prev + i·g; h = o·tanh(c).
    """
    hidden = c_prev.shape[-1]
    i = _sigmoid(xp, gates[:, :hidden])
    f = cont[:, None] * _sigmoid(xp, gates[:, hidden:2 * hidden])
    o = _sigmoid(xp, gates[:, 2 * hidden:3 * hidden])
    g = xp.tanh(gates[:, 3 * hidden:])
    c = f * c_prev + i * g
    tanh_c = xp.tanh(c)
    return c, o * tanh_c, (i, f, o, g, tanh_c)


def lstm_step_backward(xp, acts, c_prev, dc, dh):
    """Gradients of one step: (d gates (N, 4H), d c_prev), given dc and dh at its outputs.

    Caffe's formula for f's gate: dc_term·c_prev·f·(1 − f), with f = cont·σ(a_f). That is the
    exact derivative for the 0/1 indicators Caffe uses.
    """
    i, f, o, g, tanh_c = acts
    dc_term = dc + dh * o * (1 - tanh_c * tanh_c)
    dgates = xp.concatenate([dc_term * g * i * (1 - i), dc_term * c_prev * f * (1 - f),
                             dh * tanh_c * o * (1 - o), dc_term * i * (1 - g * g)], axis=1)
    return dgates, dc_term * f


@register
class LSTMUnit(Layer):
    """One LSTM step: bottoms c_prev (1, N, H), gates X (1, N, 4H) ordered (i, f, o, g), cont
    (1, N); tops c and h (1, N, H). See :func:`lstm_step`. No gradient to cont."""

    type = "LSTMUnit"
    exact_bottoms = 3
    exact_tops = 2
    allows_inplace = False

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        c_prev, gates, cont = bottom
        if c_prev.num_axes != 3 or c_prev.shape[0] != 1:
            raise self.fail(f"bottom 0 (c_prev) must be (1, N, H), got {c_prev.shape}")
        n, hidden = c_prev.shape[1:]
        if gates.shape != (1, n, 4 * hidden):
            raise self.fail(f"bottom 1 (gate inputs) must be (1, {n}, {4 * hidden}), "
                            f"got {gates.shape}")
        if cont.shape != (1, n):
            raise self.fail(f"bottom 2 (cont) must be (1, {n}), got {cont.shape}")
        top[0].reshape(c_prev.shape)
        top[1].reshape(c_prev.shape)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xp = bottom[0].xp
        c, h, _ = lstm_step(xp, bottom[1].data[0], bottom[0].data[0], bottom[2].data[0])
        top[0].data[0] = c
        top[1].data[0] = h

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[2]:
            raise self.fail("cannot back-propagate to the sequence indicators (cont)")
        xp = bottom[0].xp
        c_prev = bottom[0].data[0]
        _, _, acts = lstm_step(xp, bottom[1].data[0], c_prev, bottom[2].data[0])
        dgates, dc_prev = lstm_step_backward(xp, acts, c_prev, top[0].diff[0], top[1].diff[0])
        if propagate_down[0]:
            bottom[0].diff[0] = dc_prev
        if propagate_down[1]:
            bottom[1].diff[0] = dgates


class _Recurrent(Layer):
    """What RNN and LSTM share: bottoms, shapes, the input transform and carried state.

    Subclasses set ``states`` (names of the recurrent states) and ``gate_factor`` (width of
    the per-step pre-activations in units of H), and implement ``step_shapes()`` (their
    learned blobs after the input transform), ``run(xw, states, out)`` (the loop over time,
    returning the final states) and ``run_backward(dout)`` (the gradients of xw).
    """

    min_bottoms = 2
    max_bottoms = 5
    min_tops = 1
    max_tops = 3
    allows_inplace = False
    states: tuple[str, ...] = ()
    gate_factor = 1

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        param = self.layer_param.recurrent_param
        if param.num_output <= 0:
            raise self.fail("recurrent_param.num_output must be given and positive")
        self.hidden = param.num_output
        self.expose = param.expose_hidden
        exposed = len(self.states) if self.expose else 0
        initial = "".join(f", {name}_0" for name in self.states) if self.expose else ""
        if len(bottom) not in (2 + exposed, 3 + exposed):
            raise self.fail(f"expects bottoms x, cont[, x_static]{initial}: {2 + exposed} or "
                            f"{3 + exposed} of them, got {len(bottom)}")
        if len(top) != 1 + exposed:
            raise self.fail(f"expects {1 + exposed} top(s) (the output"
                            f"{', then the final states' if exposed else ''}), got {len(top)}")
        self.static = len(bottom) == 3 + exposed
        width = self.gate_factor * self.hidden
        shapes = [(width, bottom[0].count_range(2)), (width,)]
        if self.static:
            shapes.append((width, bottom[2].count_range(1)))
        shapes += self.step_shapes()
        self.blobs = []
        for shape in shapes:
            filler = param.bias_filler if len(shape) == 1 else param.weight_filler
            self.blobs.append(self.make_blob(shape, filler, like=bottom[0]))
        self._carried = None

    def step_shapes(self) -> list[tuple]:
        raise NotImplementedError

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2:
            raise self.fail(f"bottom 0 (x) must be (T, N, ...), got {x.shape}")
        self.t_steps, self.n = x.shape[:2]
        if cont.shape != (self.t_steps, self.n):
            raise self.fail(f"bottom 1 (cont) must be (T, N) = {(self.t_steps, self.n)}, got "
                            f"{cont.shape}")
        if x.count_range(2) != self.blobs[0].shape[1]:
            raise self.fail(f"x has {x.count_range(2)} values per step and stream, the weights "
                            f"expect {self.blobs[0].shape[1]}")
        if self.static:
            xs = bottom[2]
            if xs.num_axes < 1 or xs.shape[0] != self.n or \
                    xs.count_range(1) != self.blobs[2].shape[1]:
                raise self.fail(f"bottom 2 (x_static) must be ({self.n}, ...) with "
                                f"{self.blobs[2].shape[1]} values per stream, got {xs.shape}")
        state_shape = (1, self.n, self.hidden)
        for k, name in enumerate(self.states if self.expose else ()):
            blob = bottom[2 + self.static + k]
            if blob.shape != state_shape:
                raise self.fail(f"bottom {name}_0 must be {state_shape}, got {blob.shape}")
        top[0].reshape((self.t_steps, self.n, self.hidden))
        for k in range(len(self.states) if self.expose else 0):
            top[1 + k].reshape(state_shape)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1

    def _initial_states(self, bottom: list[Blob]) -> list:
        xp = bottom[0].xp
        if self.expose:
            first = 2 + self.static
            return [bottom[first + k].data[0] for k in range(len(self.states))]
        carried = self._carried
        if carried is None or carried[0].shape != (self.n, self.hidden):
            carried = [xp.zeros((self.n, self.hidden), dtype=bottom[0].dtype)
                       for _ in self.states]
        return carried

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._cont = bottom[1].data
        x = bottom[0].data.reshape(self.t_steps * self.n, -1)
        xw = x @ self.blobs[0].data.T + self.blobs[1].data
        xw = xw.reshape(self.t_steps, self.n, -1)
        if self.static:
            xw = xw + bottom[2].data.reshape(self.n, -1) @ self.blobs[2].data.T
        finals = self.run(xw, self._initial_states(bottom), top[0].data)
        if self.expose:
            for k, state in enumerate(finals):
                top[1 + k].data[0] = state
        else:
            self._carried = [state.copy() for state in finals]

    def compute_backward(self, top, propagate_down, bottom) -> None:
        if propagate_down[1]:
            raise self.fail("cannot back-propagate to the sequence indicators (cont)")
        dxw = self.run_backward(top[0].diff)  # no gradient enters through the final states
        dxw2 = dxw.reshape(self.t_steps * self.n, -1)
        x = bottom[0].data.reshape(self.t_steps * self.n, -1)
        if self.param_propagate_down[0]:
            self.blobs[0].diff[...] += dxw2.T @ x
        if self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dxw2.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = (dxw2 @ self.blobs[0].data).reshape(bottom[0].shape)
        if self.static:
            dstatic = dxw.sum(axis=0)
            xs = bottom[2].data.reshape(self.n, -1)
            if self.param_propagate_down[2]:
                self.blobs[2].diff[...] += dstatic.T @ xs
            if propagate_down[2]:
                bottom[2].diff[...] = (dstatic @ self.blobs[2].data).reshape(bottom[2].shape)
        if self.expose:  # Caffe's unrolled net shares only the states' data, not their diffs
            for k in range(len(self.states)):
                if propagate_down[2 + self.static + k]:
                    bottom[2 + self.static + k].diff[...] = 0

    def run(self, xw, states, out):
        raise NotImplementedError

    def run_backward(self, dout):
        raise NotImplementedError


@register
class RNN(_Recurrent):
    """Elman RNN, H = O = ``recurrent_param.num_output``:

    h_t = tanh(W_xh·x_t + b_h [+ W_xh_static·x_static] + W_hh·(cont_t·h_{t−1})),
    o_t = tanh(W_ho·h_t + b_o); the top is o (T, N, O), with h_T as an extra top when
    ``expose_hidden``. Learned blobs, in Caffe's order: W_xh (H, D), b_h (H),
    [W_xh_static (H, D_s)], W_hh (H, H), W_ho (O, H), b_o (O).
    """

    type = "RNN"
    states = ("h",)

    def step_shapes(self) -> list[tuple]:
        h = self.hidden
        return [(h, h), (h, h), (h,)]

    def run(self, xw, states, out):
        xp, cont = self.xp, self._cont
        first = 2 + self.static
        w_hh, w_ho, b_o = (self.blobs[first + k].data for k in range(3))
        h = states[0]
        self._trace = []
        for t in range(self.t_steps):
            hc = cont[t][:, None] * h
            h = xp.tanh(xw[t] + hc @ w_hh.T)
            o = xp.tanh(h @ w_ho.T + b_o)
            out[t] = o
            self._trace.append((hc, h, o))  # o kept here: an in-place layer may rewrite the top
        return [h]

    def run_backward(self, dout):
        first = 2 + self.static
        w_hh, w_ho = self.blobs[first].data, self.blobs[first + 1].data
        dxw = self.xp.empty((self.t_steps, self.n, self.hidden), dtype=dout.dtype)
        dh_next = self.xp.zeros((self.n, self.hidden), dtype=dout.dtype)
        for t in reversed(range(self.t_steps)):
            hc, h, o = self._trace[t]
            do = dout[t] * (1 - o * o)
            if self.param_propagate_down[first + 1]:
                self.blobs[first + 1].diff[...] += do.T @ h
            if self.param_propagate_down[first + 2]:
                self.blobs[first + 2].diff[...] += do.sum(axis=0)
            dz = (do @ w_ho + dh_next) * (1 - h * h)
            dxw[t] = dz
            if self.param_propagate_down[first]:
                self.blobs[first].diff[...] += dz.T @ hc
            dh_next = self._cont[t][:, None] * (dz @ w_hh)
        return dxw


@register
class LSTM(_Recurrent):
    """Long short-term memory, H = ``recurrent_param.num_output``:

    gates_t = W_xc·x_t + b_c [+ W_xc_static·x_static] + W_hc·(cont_t·h_{t−1}) (4H, ordered
    i, f, o, g), then one :class:`LSTMUnit` step gives c_t and h_t; the top is h (T, N, H),
    with h_T and c_T as extra tops when ``expose_hidden`` (initial states h_0, c_0 as
    bottoms). Learned blobs, in Caffe's order: W_xc (4H, D), b_c (4H), [W_xc_static (4H,
    D_s)], W_hc (4H, H).
    """

    type = "LSTM"
    states = ("h", "c")
    gate_factor = 4

    def step_shapes(self) -> list[tuple]:
        return [(4 * self.hidden, self.hidden)]

    def run(self, xw, states, out):
        xp, cont = self.xp, self._cont
        w_hc = self.blobs[2 + self.static].data
        h, c = states
        self._trace = []
        for t in range(self.t_steps):
            hc = cont[t][:, None] * h
            gates = xw[t] + hc @ w_hc.T
            c_new, h, acts = lstm_step(xp, gates, c, cont[t])
            self._trace.append((hc, c, acts))
            c = c_new
            out[t] = h
        return [h, c]

    def run_backward(self, dout):
        xp = self.xp
        k = 2 + self.static
        w_hc = self.blobs[k].data
        dxw = xp.empty((self.t_steps, self.n, 4 * self.hidden), dtype=dout.dtype)
        dh_next = xp.zeros((self.n, self.hidden), dtype=dout.dtype)
        dc_next = xp.zeros_like(dh_next)
        for t in reversed(range(self.t_steps)):
            hc, c_prev, acts = self._trace[t]
            dgates, dc_next = lstm_step_backward(xp, acts, c_prev, dc_next, dout[t] + dh_next)
            dxw[t] = dgates
            if self.param_propagate_down[k]:
                self.blobs[k].diff[...] += dgates.T @ hc
            dh_next = self._cont[t][:, None] * (dgates @ w_hc)
        return dxw


__all__ = ["LSTM", "LSTMUnit", "RNN", "lstm_step", "lstm_step_backward"]
