//! `render-worker` binary: pdfium in its own process, started and supervised
//! by the splitter (see `pagestream_splitter::worker`). Not meant to be run
//! by hand.

fn main() {
    std::process::exit(pagestream_splitter::worker::worker_main());
}
