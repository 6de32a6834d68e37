//! sfron's optimizers against torch.optim's on the same parameters and
//! gradients (tests/golden/optim_reference.py): SGD (momentum, Nesterov,
//! weight decay) and AdamW (weight decay, several steps for the bias
//! corrections).
//!
//! Error model: none. Both sides run the same libtorch's elementwise
//! kernels on the same values in the same order of operations (sfron's SGD
//! is written kernel for kernel after PyTorch's single-tensor SGD, its
//! AdamW calls the fused kernel of `torch.optim.AdamW(fused=True)`), and
//! an elementwise kernel has no reduction whose order could depend on
//! threads or the CPU: the weights must be equal bit for bit. A rule
//! written in another order (`g·g·(1−β₂)` for `((1−β₂)g)·g`, or PyTorch's
//! own unfused AdamW against its fused one) differs in the last bit of a
//! fraction of the entries. The steps also run on channels-last weights
//! (`device.channels_last`), which must not change a value.

use std::collections::BTreeMap;

use sfron::config::OptimizerPlan;
use sfron::engine::optim::Optimizer;
use sfron::model::weights;
use tch::{Device, Kind, Tensor};

mod support;

const STEPS: usize = 5;
const SHAPES: [&[i64]; 3] = [&[64, 3, 3, 3], &[64], &[10, 256]];

#[test]
fn sgd_and_adamw_give_torch_optims_weights_bit_for_bit() {
    let dir = support::temp_dir("optim");
    tch::manual_seed(17);
    let params: Vec<Tensor> = SHAPES
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
        .collect();
    // Gradients of mixed scales, some entries exactly zero.
    let grads: Vec<Vec<Tensor>> = (0..STEPS)
        .map(|s| {
            params
                .iter()
                .map(|p| {
                    let g = p.randn_like() * 10f64.powi(s as i32 - 2);
                    g.where_self(
                        &g.abs().gt(1e-3 * 10f64.powi(s as i32 - 2)),
                        &g.zeros_like(),
                    )
                })
                .collect()
        })
        .collect();
    let mut file: Vec<(String, Tensor)> = params
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("p.{i}"), p.shallow_clone()))
        .collect();
    for (s, gs) in grads.iter().enumerate() {
        file.extend(
            gs.iter()
                .enumerate()
                .map(|(i, g)| (format!("g.{s}.{i}"), g.shallow_clone())),
        );
    }
    let input = dir.join("in.safetensors");
    weights::save(&input, &file, &BTreeMap::new()).unwrap();

    let cases = [
        (
            "sgd",
            0.1,
            OptimizerPlan::Sgd {
                momentum: 0.9,
                nesterov: false,
                weight_decay: 5e-4,
            },
            serde_json::json!({"kind": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
        ),
        (
            "nesterov",
            0.05,
            OptimizerPlan::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.0,
            },
            serde_json::json!({"kind": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": true}),
        ),
        (
            "adamw",
            2e-3,
            OptimizerPlan::AdamW {
                betas: [0.9, 0.999],
                eps: 1e-8,
                weight_decay: 0.05,
            },
            serde_json::json!({"kind": "adamw", "lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                               "weight_decay": 0.05, "fused": true}),
        ),
        (
            "adamw-dit",
            1e-4,
            OptimizerPlan::AdamW {
                betas: [0.9, 0.999],
                eps: 1e-8,
                weight_decay: 0.0,
            },
            serde_json::json!({"kind": "adamw", "lr": 1e-4, "weight_decay": 0.0, "fused": true}),
        ),
    ];
    let spec: Vec<serde_json::Value> = cases
        .iter()
        .map(|(name, _, _, json)| {
            let mut j = json.clone();
            j["name"] = serde_json::json!(name);
            j
        })
        .collect();
    let reference = dir.join("reference.safetensors");
    support::run_python(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/optim_reference.py"
        ),
        &[
            input.as_os_str(),
            reference.as_os_str(),
            std::ffi::OsStr::new(&serde_json::Value::Array(spec).to_string()),
        ],
    );
    let expected: BTreeMap<String, Tensor> =
        weights::load(&reference).unwrap().0.into_iter().collect();
    for ((name, lr, plan, _), channels_last) in cases.iter().flat_map(|c| [(c, false), (c, true)]) {
        let mine: Vec<Tensor> = params
            .iter()
            .map(|p| match channels_last {
                // A copy first: to_channels_last hands back 1-D and 2-D
                // tensors as they are, storage shared.
                true => sfron::model::layout::to_channels_last(&p.copy()),
                false => p.copy(),
            })
            .collect();
        let mut opt = Optimizer::new(plan.clone(), mine.len());
        for gs in &grads {
            opt.step(&mine, gs, *lr);
        }
        for (i, p) in mine.iter().enumerate() {
            let want = &expected[&format!("{name}.{i}")];
            let differ = p.ne_tensor(want).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(
                differ,
                0,
                "{name} (channels-last {channels_last}), parameter {i}: {differ} of {} entries \
                 differ from torch.optim's",
                p.numel()
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
