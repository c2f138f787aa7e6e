//! The cut-over plan (`tidemark cutover --plan FILE`): any text is parsed or
//! refused with a field, never a panic; a plan that parses keeps the
//! module's promise that it converts to requests without an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_client::cutover::{CutoverPlan, Step};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(plan) = CutoverPlan::from_toml(text) else {
        return;
    };
    plan.pipeline_spec()
        .expect("a plan that validates converts to a pipeline spec");
    plan.verification_spec()
        .expect("a plan that validates converts to a verification spec");
    for step in Step::ALL {
        assert!(!step.deadline(&plan.deadlines).is_zero());
    }
    assert!(plan.max_pause() <= std::time::Duration::from_secs(3600));
    let _ = (plan.route_job(), plan.verification_job(true));
});
