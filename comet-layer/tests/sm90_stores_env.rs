//! `COMET_SM90_STORES` (CPU only): the default of `LayerOptions::sm90_training_stores` comes
//! from it like the engine's from `COMET_GEMM_ENGINE` (on when unset; `0` turns the Hopper
//! engine's training stores off), and a bad value is reported by
//! `LayerOptions::validate` (what `MoeLayer::new` calls). The environment is per process, so
//! the test runs this binary again, filtered to itself, once per value (no variable is set
//! in this process, where other tests run on other threads).

use std::process::Command;

use comet_layer::{Error, GemmEngine, LayerOptions, Strategy};

/// Set in the child: what it should find (`on`, `off`, or `error:<value>`).
const EXPECT_VAR: &str = "COMET_LAYER_TEST_SM90_STORES_EXPECT";
const TEST_NAME: &str = "sm90_stores_env_override_and_errors";

/// The child's side: the options built from this process's environment.
fn check_child(expect: &str) {
    let o = LayerOptions::new(Strategy::Sequential, 8);
    match expect {
        "on" | "off" => {
            let on = expect == "on";
            assert_eq!(o.sm90_training_stores, on, "{expect}");
            assert_eq!(LayerOptions::sm90_stores_from_env().unwrap(), on);
            o.validate().unwrap();
            // The builder still decides.
            assert_eq!(
                o.clone().sm90_training_stores(!on).sm90_training_stores,
                !on
            );
            // The engine's variable is not touched by this one.
            assert_eq!(o.engine, GemmEngine::Auto);
        }
        bad => {
            let value = bad
                .strip_prefix("error:")
                .expect("an error:<value> expectation");
            assert!(
                o.sm90_training_stores,
                "a bad value leaves the option at its default (on)"
            );
            let e = o.validate().unwrap_err();
            assert!(
                matches!(&e, Error::ParseSm90Stores { value: v } if v == value),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(value) && msg.contains("COMET_SM90_STORES"),
                "{msg}"
            );
            assert!(LayerOptions::sm90_stores_from_env().is_err());
        }
    }
}

#[test]
fn sm90_stores_env_override_and_errors() {
    if let Ok(expect) = std::env::var(EXPECT_VAR) {
        check_child(&expect);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let runs: [(Option<&str>, &str); 7] = [
        (None, "on"),
        (Some("1"), "on"),
        (Some("0"), "off"),
        (Some(" Off "), "off"),
        (Some(" On "), "on"),
        (Some("2"), "error:2"),
        (Some("yes"), "error:yes"),
    ];
    for (value, expect) in runs {
        let mut cmd = Command::new(&exe);
        cmd.args(["--exact", TEST_NAME, "--test-threads=1", "--nocapture"])
            .env(EXPECT_VAR, expect)
            .env_remove("COMET_GEMM_ENGINE");
        match value {
            Some(v) => cmd.env(LayerOptions::SM90_STORES_ENV, v),
            None => cmd.env_remove(LayerOptions::SM90_STORES_ENV),
        };
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "COMET_SM90_STORES={value:?} (expected {expect}):\n{text}"
        );
        // The child really ran the test (a filter matching nothing also succeeds).
        assert!(text.contains("1 passed"), "{value:?}: {text}");
    }
}
