//! The vendored candle-core's backward-pass patches (vendor/README.md): `Tensor::backward` stores
//! the first gradient reaching a tensor instead of adding it to fresh zeros, and a matmul's
//! backward skips a side that tracks no op. Gradients with several terms, reached through views
//! (transposes, broadcasts, narrows) and through the patched and unpatched rules alike, must
//! still be the exact sums; a frozen side of a matmul gets no gradient.
#![allow(clippy::unwrap_used, reason = "tests")]

use candle_core::{D, Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len());
    for (index, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
            "at {index}: {g} vs {e}"
        );
    }
}

#[test]
fn a_tensor_used_several_ways_gets_the_sum_of_its_gradients() {
    let device = Device::Cpu;
    let start: Vec<f32> = (0..6).map(|i| 0.25 * i as f32 - 0.6).collect();
    let x = Var::from_vec(start.clone(), (2, 3), &device).unwrap();
    let w = Var::from_vec(vec![0.5f32, -1.0, 2.0], (1, 3), &device).unwrap();
    // y = Σ [ 3·xᵀ(transposed back) + x² + exp(x) + x·w (w broadcast over rows) − x[:, 1:] ]
    let xt = x
        .as_tensor()
        .t()
        .unwrap()
        .affine(3.0, 0.0)
        .unwrap()
        .t()
        .unwrap();
    let square = x.as_tensor().sqr().unwrap();
    let exp = x.as_tensor().exp().unwrap();
    let scaled = x.as_tensor().broadcast_mul(w.as_tensor()).unwrap();
    let total = (((xt + square).unwrap() + exp).unwrap() + scaled).unwrap();
    let narrow = x.as_tensor().narrow(1, 1, 2).unwrap();
    let y = (total.sum_all().unwrap() - narrow.sum_all().unwrap()).unwrap();
    let grads = y.backward().unwrap();

    let weights = [0.5f32, -1.0, 2.0];
    let expected_x: Vec<f32> = start
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let col = i % 3;
            3.0 + 2.0 * v + v.exp() + weights[col] - if col >= 1 { 1.0 } else { 0.0 }
        })
        .collect();
    assert_close(&values(grads.get(x.as_tensor()).unwrap()), &expected_x);
    let expected_w: Vec<f32> = (0..3).map(|col| start[col] + start[3 + col]).collect();
    let grad_w = grads.get(w.as_tensor()).unwrap();
    assert_eq!(grad_w.dims(), &[1, 3]);
    assert_close(&values(grad_w), &expected_w);
}

#[test]
fn a_gradient_reached_through_a_view_is_stored_contiguous() {
    let device = Device::Cpu;
    let a = Var::from_vec(vec![1f32, 2.0, 3.0, 4.0], (2, 2), &device).unwrap();
    let b = Var::from_vec(vec![-1f32, 0.5, 0.25, 2.0], (2, 2), &device).unwrap();
    // exp of a sum over a transposed view: the gradient reaching `a` comes through a transpose.
    let y = (a.as_tensor().t().unwrap() + b.as_tensor())
        .unwrap()
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = y.backward().unwrap();
    let (ga, gb) = (
        grads.get(a.as_tensor()).unwrap(),
        grads.get(b.as_tensor()).unwrap(),
    );
    assert!(ga.is_contiguous() && gb.is_contiguous());
    // d/db exp(aᵀ + b) = exp(aᵀ + b); d/da is its transpose.
    let at = [1f32, 3.0, 2.0, 4.0];
    let bv = [-1f32, 0.5, 0.25, 2.0];
    let expected_b: Vec<f32> = at.iter().zip(bv).map(|(x, y)| (x + y).exp()).collect();
    assert_close(&values(gb), &expected_b);
    let expected_a = [expected_b[0], expected_b[2], expected_b[1], expected_b[3]];
    assert_close(&values(ga), &expected_a);
}

#[test]
fn both_sides_of_an_op_on_one_tensor_and_offset_views_add_up() {
    let device = Device::Cpu;
    let start = [0.5f32, -2.0, 1.5];
    let x = Var::from_vec(start.to_vec(), 3, &device).unwrap();
    let other = Var::from_vec(vec![3f32, 4.0, 5.0], 3, &device).unwrap();
    // x + x and x * x: both of an op's sides are the same tensor (the second term is added to
    // the first, stored one). stack(..).get(1): a view at an offset into a larger storage.
    let stacked = Tensor::stack(&[other.as_tensor(), x.as_tensor()], 0).unwrap();
    let y = ((x.as_tensor() + x.as_tensor()).unwrap() + x.as_tensor().sqr().unwrap())
        .unwrap()
        .add(&(x.as_tensor() * x.as_tensor()).unwrap())
        .unwrap()
        .add(&stacked.get(1).unwrap().affine(4.0, 0.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = y.backward().unwrap();
    // d/dx [2x + x² + x² + 4x] = 6 + 4x; `other` reaches y only through the stack's row 0.
    let expected: Vec<f32> = start.iter().map(|v| 6.0 + 4.0 * v).collect();
    assert_close(&values(grads.get(x.as_tensor()).unwrap()), &expected);
    assert_close(&values(grads.get(other.as_tensor()).unwrap()), &[0.0; 3]);
}

/// The vendored backward's second patch: a side of a matmul that tracks no op (a frozen weight)
/// gets no gradient, where the release computed and kept one as large as the weight (for an
/// output head, vocabulary × hidden). The tracked side's gradient is unchanged.
#[test]
fn a_frozen_side_of_a_matmul_gets_no_gradient() {
    let device = Device::Cpu;
    let x = Var::from_vec(vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &device).unwrap();
    let w = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.25, 3.0, -0.5]], &device).unwrap();
    assert!(!w.track_op());

    // y = Σ x·wᵀ: ∂y/∂x has every row equal to the column sums of w. The matmul's right side is
    // the view `wt` (its own tensor): the release stored its gradient.
    let wt = w.t().unwrap();
    let right = x.as_tensor().matmul(&wt).unwrap();
    let grads = right.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&wt).is_none());
    assert!(grads.get(&w).is_none());
    assert_close(
        &values(grads.get(x.as_tensor()).unwrap()),
        &[0.75, 2.0, 1.5, 0.75, 2.0, 1.5],
    );

    // y = Σ w·xᵀ (the frozen side on the left): the same gradient for x, none for w.
    let left = w.matmul(&x.as_tensor().t().unwrap()).unwrap();
    let grads = left.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none());
    assert_close(
        &values(grads.get(x.as_tensor()).unwrap()),
        &[0.75, 2.0, 1.5, 0.75, 2.0, 1.5],
    );

    // Both sides tracked: both still get their gradients.
    let v = Var::from_tensor(&w).unwrap();
    let both = x.as_tensor().matmul(&v.as_tensor().t().unwrap()).unwrap();
    let grads = both.sum_all().unwrap().backward().unwrap();
    // ∂y/∂v has every row equal to the column sums of x.
    assert_close(
        &values(grads.get(v.as_tensor()).unwrap()),
        &[5.0, 7.0, 9.0, 5.0, 7.0, 9.0],
    );
}
