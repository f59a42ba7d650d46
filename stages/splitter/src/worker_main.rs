//! `render-worker` binary: pdfium in its own process, started and supervised
//! by the splitter (see `pagestream_splitter::worker`). Not meant to be run
//! by hand.

use pagestream_splitter::worker::{FAULT_ENV, TEST_FAULTS};

fn main() {
    if !TEST_FAULTS && std::env::var_os(FAULT_ENV).is_some() {
        // A test that injects faults, run against workers built without
        // them, would pass without testing anything: refuse to start, so
        // the splitter fails loudly, naming the fix.
        eprintln!(
            "render-worker: {FAULT_ENV} is set but this build has no test faults (build with \
             `--features pagestream-splitter/test-faults`): refusing to start"
        );
        std::process::exit(2);
    }
    std::process::exit(pagestream_splitter::worker::worker_main());
}
