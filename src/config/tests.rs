//! Layering, precedence and error messages of the configuration.

use std::path::PathBuf;

use super::raw::{DeviceKind, LogFormat, LogLevel};
use super::*;
use crate::comm::Topology;

fn temp_toml(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sfron-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sets(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn error_of(layers: &Layers) -> String {
    load(layers)
        .expect_err("expected a config error")
        .to_string()
}

/// The message of a configuration that loads but makes no valid plan.
fn plan_error_of(set: &str) -> String {
    let loaded = load(&Layers {
        sets: sets(&[set]),
        ..Layers::default()
    })
    .unwrap();
    RunPlan::new(loaded, &Topology::single(), 2)
        .unwrap_err()
        .to_string()
}

#[test]
fn no_layers_gives_the_defaults() {
    let loaded = load(&Layers::default()).unwrap();
    assert_eq!(loaded.raw, RawConfig::default());
    assert_eq!(loaded.origin("device.kind"), "built-in default");
}

#[test]
fn each_layer_overrides_the_ones_below() {
    let file = temp_toml(
        "layers.toml",
        "[device]\nthreads = 2\nkind = \"cpu\"\n[log]\nlevel = \"debug\"\n[run]\nseed = 1\n",
    );
    let only_file = Layers {
        file: Some(file.clone()),
        ..Layers::default()
    };
    let raw = load(&only_file).unwrap().raw;
    assert_eq!(
        (raw.device.threads, raw.device.kind, raw.run.seed),
        (2, DeviceKind::Cpu, 1)
    );

    let with_env = Layers {
        file: Some(file.clone()),
        env: env(&[("SFRON_THREADS", "3"), ("SFRON_SEED", "7")]),
        sets: vec![],
    };
    let loaded = load(&with_env).unwrap();
    assert_eq!((loaded.raw.device.threads, loaded.raw.run.seed), (3, 7));
    assert_eq!(
        loaded.origin("device.threads"),
        "environment variable SFRON_THREADS"
    );
    assert_eq!(loaded.origin("device.kind"), file.display().to_string());

    let with_sets = Layers {
        file: Some(file.clone()),
        env: env(&[("SFRON_THREADS", "3"), ("SFRON_SEED", "7")]),
        sets: sets(&[
            "device.threads=4",
            "run.seed=8",
            "run.seed=9",
            "log.format=json",
        ]),
    };
    let loaded = load(&with_sets).unwrap();
    assert_eq!(loaded.raw.device.threads, 4);
    assert_eq!(
        loaded.raw.run.seed, 9,
        "a later --set wins over an earlier one"
    );
    assert_eq!(loaded.raw.log.format, LogFormat::Json);
    assert_eq!(
        loaded.raw.log.level,
        LogLevel::Debug,
        "untouched file keys stay"
    );
    assert_eq!(loaded.origin("run.seed"), "--set run.seed=9");
}

#[test]
fn environment_variables_outside_the_list_are_ignored() {
    let loaded = load(&Layers {
        env: env(&[("SFRON_RUN_NAME", "x")]),
        ..Layers::default()
    })
    .unwrap();
    assert_eq!(loaded.raw.run.name, "default");
}

#[test]
fn unknown_key_in_a_file_names_key_file_and_allowed_keys() {
    let file = temp_toml("unknown.toml", "[device]\nkindd = \"cpu\"\n");
    let msg = error_of(&Layers {
        file: Some(file.clone()),
        ..Layers::default()
    });
    assert!(msg.contains("`device.kindd`"), "{msg}");
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    assert!(msg.contains("`kind`") && msg.contains("`threads`"), "{msg}");
}

#[test]
fn unknown_section_names_the_file_it_came_from() {
    let file = temp_toml("section.toml", "[modle]\narch = \"x\"\n");
    let msg = error_of(&Layers {
        file: Some(file.clone()),
        ..Layers::default()
    });
    assert!(
        msg.contains("`modle`") && msg.contains(&file.display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("`run`, `device`, `comm`, `log`"), "{msg}");
}

#[test]
fn wrong_type_names_key_and_flag() {
    let msg = error_of(&Layers {
        sets: sets(&["device.threads=many"]),
        ..Layers::default()
    });
    assert!(
        msg.contains("`device.threads`") && msg.contains("--set device.threads=many"),
        "{msg}"
    );
    assert!(msg.contains("integer"), "{msg}");
    let file = temp_toml("negative.toml", "[run]\nseed = -1\n");
    let msg = error_of(&Layers {
        file: Some(file),
        ..Layers::default()
    });
    assert!(msg.contains("`run.seed`") && msg.contains("-1"), "{msg}");
}

#[test]
fn wrong_enum_value_lists_the_allowed_values_and_the_variable() {
    let msg = error_of(&Layers {
        env: env(&[("SFRON_DEVICE", "tpu")]),
        ..Layers::default()
    });
    assert!(msg.contains("`device.kind`"), "{msg}");
    assert!(msg.contains("environment variable SFRON_DEVICE"), "{msg}");
    assert!(msg.contains("auto, cpu, cuda"), "{msg}");
}

#[test]
fn bad_set_syntax_and_bad_files_are_named() {
    let msg = error_of(&Layers {
        sets: sets(&["device.threads"]),
        ..Layers::default()
    });
    assert!(
        msg.contains("--set device.threads") && msg.contains("key.path=value"),
        "{msg}"
    );
    let msg = error_of(&Layers {
        sets: sets(&["device..threads=1"]),
        ..Layers::default()
    });
    assert!(msg.contains("dotted words"), "{msg}");
    let broken = temp_toml("broken.toml", "[device\nthreads = 1\n");
    let msg = error_of(&Layers {
        file: Some(broken.clone()),
        ..Layers::default()
    });
    assert!(
        msg.contains(&broken.display().to_string()) && msg.contains("line 1"),
        "{msg}"
    );
    let missing = PathBuf::from("/nonexistent/sfron.toml");
    let msg = error_of(&Layers {
        file: Some(missing),
        ..Layers::default()
    });
    assert!(msg.contains("/nonexistent/sfron.toml"), "{msg}");
}

#[test]
fn resolved_toml_loads_back_to_the_same_config() {
    let layers = Layers {
        sets: sets(&["run.seed=42", "device.kind=cpu", "run.name=study-1"]),
        ..Layers::default()
    };
    let loaded = load(&layers).unwrap();
    let path = temp_toml("resolved.toml", &loaded.resolved_toml());
    let again = load(&Layers {
        file: Some(path),
        ..Layers::default()
    })
    .unwrap();
    assert_eq!(again.raw, loaded.raw);
}

#[test]
fn plan_derives_threads_and_run_dir() {
    let topo = Topology {
        rank: 1,
        size: 4,
        local_rank: 1,
        local_size: 2,
    };
    let plan = RunPlan::new(load(&Layers::default()).unwrap(), &topo, 16).unwrap();
    assert_eq!(plan.threads, 8, "16 cores shared by 2 ranks on this host");
    assert_eq!(plan.run_dir, PathBuf::from("runs/default"));
    let one_core = RunPlan::new(load(&Layers::default()).unwrap(), &topo, 1).unwrap();
    assert_eq!(one_core.threads, 1);
    let set = load(&Layers {
        sets: sets(&["device.threads=3"]),
        ..Layers::default()
    })
    .unwrap();
    assert_eq!(RunPlan::new(set, &topo, 16).unwrap().threads, 3);
}

#[test]
fn plan_rejects_values_with_the_key_and_its_origin() {
    let topo = Topology::single();
    let loaded = load(&Layers {
        sets: sets(&["device.threads=5000"]),
        ..Layers::default()
    })
    .unwrap();
    let msg = RunPlan::new(loaded, &topo, 2).unwrap_err().to_string();
    assert!(
        msg.contains("`device.threads`") && msg.contains("--set device.threads=5000"),
        "{msg}"
    );
    assert!(msg.contains("0 (automatic) to 1024"), "{msg}");
    let loaded = load(&Layers {
        env: env(&[("SFRON_RUN_ROOT", " ")]),
        ..Layers::default()
    })
    .unwrap();
    let msg = RunPlan::new(loaded, &topo, 2).unwrap_err().to_string();
    assert!(
        msg.contains("`run.root`") && msg.contains("SFRON_RUN_ROOT"),
        "{msg}"
    );
    let loaded = load(&Layers {
        sets: sets(&["run.name=../escape"]),
        ..Layers::default()
    })
    .unwrap();
    let msg = RunPlan::new(loaded, &topo, 2).unwrap_err().to_string();
    assert!(
        msg.contains("`run.name`") && msg.contains("not a folder name"),
        "{msg}"
    );
}

#[test]
fn dry_run_description_shows_origins_and_derived_values() {
    let loaded = load(&Layers {
        sets: sets(&["run.seed=5"]),
        ..Layers::default()
    })
    .unwrap();
    let text = RunPlan::new(loaded, &Topology::single(), 4)
        .unwrap()
        .describe();
    assert!(
        text.contains("run.seed = 5") && text.contains("# --set run.seed=5"),
        "{text}"
    );
    assert!(text.contains("threads_per_rank = 4"), "{text}");
}

#[test]
fn shipped_reference_config_equals_the_defaults() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/reference.toml");
    let loaded = load(&Layers {
        file: Some(path),
        ..Layers::default()
    })
    .unwrap();
    assert_eq!(
        loaded.raw,
        RawConfig::default(),
        "configs/reference.toml drifted from raw.rs"
    );
}

#[test]
fn data_keys_are_validated_with_their_origin() {
    let msg = error_of(&Layers {
        sets: sets(&["data.format=imagenet"]),
        ..Layers::default()
    });
    assert!(
        msg.contains("`data.format`") && msg.contains("mnist, cifar10, cifar100, imagefolder, tar"),
        "{msg}"
    );
    let topo = Topology::single();
    let loaded = load(&Layers {
        sets: sets(&["data.prefetch=0"]),
        ..Layers::default()
    })
    .unwrap();
    let msg = RunPlan::new(loaded, &topo, 2).unwrap_err().to_string();
    assert!(
        msg.contains("`data.prefetch`") && msg.contains("at least 1"),
        "{msg}"
    );
    let loaded = load(&Layers {
        sets: sets(&["data.transform=imagenet"]),
        ..Layers::default()
    })
    .unwrap();
    let msg = RunPlan::new(loaded, &topo, 2).unwrap_err().to_string();
    assert!(
        msg.contains("`data.transform`") && msg.contains("mnist"),
        "{msg}"
    );
    let loaded = load(&Layers {
        env: env(&[("SFRON_DATA_ROOT", "/data/imagenet")]),
        sets: sets(&["data.format=imagefolder", "data.on_corrupt=skip"]),
        ..Layers::default()
    })
    .unwrap();
    let plan = RunPlan::new(loaded, &topo, 2).unwrap();
    assert_eq!(plan.data.root, PathBuf::from("/data/imagenet"));
    assert_eq!(plan.data.train_transform.shape, [3, 224, 224]);
    assert_eq!(plan.data.on_corrupt, crate::data::CorruptPolicy::Skip);
}

#[test]
fn set_values_nan_and_inf_stay_strings() {
    let loaded = load(&Layers {
        sets: vec!["run.name=nan".into()],
        ..Layers::default()
    })
    .unwrap();
    assert_eq!(loaded.raw.run.name, "nan");
}

#[test]
fn every_shipped_preset_gives_a_valid_plan() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let loaded = load(&Layers {
                file: Some(path.clone()),
                ..Layers::default()
            })
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            RunPlan::new(loaded, &Topology::single(), 2)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Its header says whether its values were measured with sfron
            // ("Measured: no. Carried over ..." or "Measured with sfron (where) ...").
            let text = std::fs::read_to_string(&path).unwrap();
            let header: Vec<&str> = text
                .lines()
                .take_while(|l| l.starts_with('#') || l.trim().is_empty())
                .collect();
            let reference = path.file_name().is_some_and(|n| n == "reference.toml");
            assert!(
                reference || header.iter().any(|l| l.starts_with("# Measured")),
                "{}: the header has no \"# Measured\" line",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 5, "only {seen} presets in configs/");
}

#[test]
fn study_and_eval_keys_are_validated() {
    for (set, expect) in [
        ("study.seeds=[]", "at least one seed"),
        ("study.seeds=[1, 2, 1]", "seed 1 is listed twice"),
        (
            r#"study.methods=["sfron", "ga", "sfron"]"#,
            "sfron is listed twice",
        ),
        ("study.methods=[]", "at least one method"),
        ("study.scenario=half", "study.scenario"),
        ("eval.batch=0", "eval.batch"),
    ] {
        let msg = plan_error_of(set);
        assert!(msg.contains(expect), "{set}: {msg}");
    }
    let msg = error_of(&Layers {
        sets: sets(&[r#"study.methods=["sfron", "dreaming"]"#]),
        ..Layers::default()
    });
    assert!(
        msg.contains("study.methods") && msg.contains("dreaming"),
        "{msg}"
    );
}

#[test]
fn device_and_comm_keys_are_validated() {
    for (set, expect) in [
        ("comm.bucket_mib=-1", "comm.bucket_mib"),
        ("comm.first_bucket_mib=5000", "comm.first_bucket_mib"),
        ("comm.first_bucket_mib=0", "comm.first_bucket_mib"),
        ("comm.segment_kib=2000000", "comm.segment_kib"),
    ] {
        let msg = plan_error_of(set);
        assert!(msg.contains(expect), "{set}: {msg}");
    }
    for (set, key) in [
        ("device.precision=fp16", "device.precision"),
        ("comm.gpu_plane=gloo", "comm.gpu_plane"),
    ] {
        let msg = error_of(&Layers {
            sets: sets(&[set]),
            ..Layers::default()
        });
        assert!(msg.contains(key), "{set}: {msg}");
    }
    // One call for everything is allowed, and bf16 with channels-last reads back.
    let loaded = load(&Layers {
        sets: sets(&[
            "comm.bucket_mib=0",
            "comm.first_bucket_mib=0",
            "device.precision=bf16",
            "device.channels_last=true",
        ]),
        ..Layers::default()
    })
    .unwrap();
    let plan = RunPlan::new(loaded, &Topology::single(), 2).unwrap();
    assert_eq!(plan.comm.bucket_mib, 0.0);
    assert_eq!(plan.precision, crate::config::raw::Precision::Bf16);
    assert!(plan.channels_last);
}

#[test]
fn a_preset_builds_on_its_base_and_a_cycle_is_refused() {
    temp_toml("base.toml", "[run]\nseed = 3\n[train]\nepochs = 7\n");
    let child = temp_toml("child.toml", "base = \"base.toml\"\n[train]\nepochs = 9\n");
    let loaded = load(&Layers {
        file: Some(child),
        ..Layers::default()
    })
    .unwrap();
    assert_eq!((loaded.raw.run.seed, loaded.raw.train.epochs), (3, 9));
    assert!(loaded.origin("run.seed").ends_with("base.toml"));
    assert!(loaded.origin("train.epochs").ends_with("child.toml"));

    let a = temp_toml("cycle-a.toml", "base = \"cycle-b.toml\"\n");
    temp_toml("cycle-b.toml", "base = \"cycle-a.toml\"\n");
    let msg = error_of(&Layers {
        file: Some(a),
        ..Layers::default()
    });
    assert!(msg.contains("base") && msg.contains("cycle"), "{msg}");
}
