//! Inference backends: ONNX Runtime (`ort`, CPU or CUDA) and tract (pure
//! Rust, CPU). Both take an NCHW float32 batch and return every output as
//! float32 with its shape, in the model's declared output order, so the
//! decoders never know which backend ran.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::value::Tensor;

/// Which engine runs the model, and where (the configuration's choices).
pub use crate::config::{Backend as BackendKind, Device};

/// How to run a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub backend: BackendKind,
    pub device: Device,
    /// CPU threads per model (≥ 1): ONNX Runtime divides them among its
    /// sessions; tract runs that many pages side by side.
    pub threads: usize,
    /// ONNX Runtime on the CPU: sessions that run pages side by side (each
    /// with `threads / sessions` intra-op threads). 1 = one run at a time
    /// using every thread.
    pub sessions: usize,
    /// ONNX Runtime on the CPU: each session's memory arena.
    pub cpu_arena: bool,
    /// Path of libonnxruntime (ort only).
    pub onnxruntime_library: std::path::PathBuf,
}

/// One output tensor, as float32.
#[derive(Debug, Clone, PartialEq)]
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: Vec<f32>,
}

/// A model's declared interface. Unknown or symbolic dimensions are `-1`.
#[derive(Debug, Clone, Default)]
pub struct ModelIo {
    pub inputs: Vec<(String, Vec<i64>)>,
    pub outputs: Vec<(String, Vec<i64>)>,
    /// ONNX `metadata_props`.
    pub metadata: HashMap<String, String>,
}

impl ModelIo {
    pub fn output_names(&self) -> Vec<&str> {
        self.outputs.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// A loaded model that runs a batch.
pub trait Backend: Send + Sync {
    fn io(&self) -> &ModelIo;
    /// Runs `input` (`shape` = `[n, 3, h, w]`); outputs in declared order.
    fn run(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Vec<OutTensor>, String>;
    /// Largest batch one run accepts.
    fn max_batch(&self) -> usize;
    /// Runs that may go on at once (each on its own thread).
    fn parallel_runs(&self) -> usize {
        1
    }
    /// The device in use: `cpu` or `cuda`.
    fn device(&self) -> &'static str;
}

/// Loads `weights` on the chosen backend. `input` names the image input and
/// its width and height (the batch axis stays as the model declares it).
pub fn load(
    opts: &EngineOptions,
    model: &str,
    weights: &[u8],
    input: (&str, u32, u32),
) -> Result<Box<dyn Backend>, String> {
    match opts.backend {
        BackendKind::Ort => Ok(Box::new(OrtBackend::load(opts, model, weights)?)),
        #[cfg(feature = "tract")]
        BackendKind::Tract => Ok(Box::new(tract_backend::TractBackend::load(opts.threads, model, weights, input)?)),
        #[cfg(not(feature = "tract"))]
        BackendKind::Tract => {
            let _ = input;
            Err("this inferencer was built without the tract backend (cargo feature `tract`)".into())
        }
    }
}

/// Loads `weights` for inputs of any shape (the OCR models: a page's size,
/// a text line's width). ONNX Runtime takes them as they come; tract plans
/// the model once per input shape it meets and keeps the last plans.
pub fn load_any_shape(opts: &EngineOptions, model: &str, weights: &[u8]) -> Result<Box<dyn Backend>, String> {
    match opts.backend {
        BackendKind::Ort => {
            let one = EngineOptions { sessions: 1, ..opts.clone() };
            Ok(Box::new(OrtBackend::load(&one, model, weights)?))
        }
        #[cfg(feature = "tract")]
        BackendKind::Tract => Ok(Box::new(tract_backend::TractShapes::load(model, weights)?)),
        #[cfg(not(feature = "tract"))]
        BackendKind::Tract => Err("this inferencer was built without the tract backend (cargo feature `tract`)".into()),
    }
}

static ORT_ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads libonnxruntime (once per process).
fn ort_environment(library: &Path) -> Result<&'static ort::environment::Environment, String> {
    ORT_ENV
        .get_or_init(|| {
            if !library.exists() {
                return Err(format!(
                    "libonnxruntime not found at {} (set PAGESTREAM_INFERENCER_ONNXRUNTIME_LIBRARY, or run scripts/setup to install it)",
                    library.display()
                ));
            }
            ort::init_from(library)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", library.display()))?
                .with_name("pagestream")
                .build()
                .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The ONNX Runtime this process loaded (its build info up to the compile
/// flags: git commit, build type), once a session was created.
pub fn onnxruntime_build() -> Option<String> {
    ORT_ENV.get()?.as_ref().ok()?;
    let info = ort::info();
    Some(info.split(", cmake").next().unwrap_or(info).trim().to_string())
}

pub struct OrtBackend {
    /// One per page run side by side (CPU; a single one on CUDA).
    sessions: Vec<Mutex<Session>>,
    io: ModelIo,
    device: &'static str,
}

/// What `device = "cuda"` needs, for error messages.
const CUDA_HINT: &str = "it needs the onnxruntime-gpu build of libonnxruntime (with libonnxruntime_providers_cuda.so \
    and libonnxruntime_providers_shared.so beside it), the CUDA 13 runtime, cuBLAS, cuFFT, cuRAND and cuDNN 9 \
    libraries on the loader path, and a visible NVIDIA GPU: see docs/models.md, \"Running on a GPU\"";

impl OrtBackend {
    fn load(opts: &EngineOptions, model: &str, weights: &[u8]) -> Result<OrtBackend, String> {
        let env = ort_environment(&opts.onnxruntime_library)?;
        let sessions = opts.sessions.clamp(1, opts.threads.max(1));
        let intra = (opts.threads / sessions).max(1);
        let builder = || {
            Session::builder(env)
                .and_then(|b| Ok(b.with_intra_threads(intra)?))
                .and_then(|b| Ok(b.with_inter_threads(1)?))
                // Idle pool threads spin-wait by default, burning the CPU the
                // splitter and uploader need on a small machine.
                .and_then(|b| Ok(b.with_intra_op_spinning(false)?))
                .map_err(|e| format!("model {model}: ONNX Runtime session options: {e}"))
        };
        let cpu = || {
            builder()?
                .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(opts.cpu_arena).build()])
                .map_err(|e| format!("model {model}: ONNX Runtime session options: {e}"))?
                .with_memory_pattern(false)
                .map_err(|e| format!("model {model}: ONNX Runtime session options: {e}"))?
                .commit_from_memory(weights)
                .map_err(|e| format!("model {model}: ONNX Runtime cannot load it: {e}"))
        };
        let (session, device) = match opts.device {
            Device::Cpu => (cpu()?, "cpu"),
            Device::Cuda => (cuda_session(builder()?, weights, &opts.onnxruntime_library)?, "cuda"),
            Device::Auto => match cuda_session(builder()?, weights, &opts.onnxruntime_library) {
                Ok(s) => (s, "cuda"),
                Err(why) => {
                    tracing::warn!(model, reason = %why, "device=auto: CUDA is not usable, running on the CPU");
                    (cpu()?, "cpu")
                }
            },
        };
        let io = ort_io(&session).map_err(|e| format!("model {model}: {e}"))?;
        let mut all = vec![Mutex::new(session)];
        if device == "cpu" {
            for _ in 1..sessions {
                all.push(Mutex::new(cpu()?));
            }
        }
        Ok(OrtBackend { sessions: all, io, device })
    }
}

/// A session on the CUDA execution provider, or an error naming what is missing.
fn cuda_session(
    mut builder: ort::session::builder::SessionBuilder,
    weights: &[u8],
    library: &Path,
) -> Result<Session, String> {
    use ort::ep::ExecutionProvider;
    match ort::ep::CUDA::is_available() {
        Ok(true) => {}
        Ok(false) => {
            return Err(format!(
                "device=cuda: the ONNX Runtime library {} has no CUDA execution provider (it is a CPU-only build); {CUDA_HINT}",
                library.display()
            ))
        }
        Err(e) => return Err(format!("device=cuda: cannot list ONNX Runtime's execution providers: {e}")),
    }
    builder = builder
        .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
        .map_err(|e| format!("device=cuda: ONNX Runtime cannot start its CUDA execution provider: {e}; {CUDA_HINT}"))?;
    builder
        .commit_from_memory(weights)
        .map_err(|e| format!("device=cuda: ONNX Runtime cannot create a CUDA session: {e}; {CUDA_HINT}"))
}

fn ort_io(session: &Session) -> Result<ModelIo, String> {
    let dims = |t: &ort::value::ValueType| t.tensor_shape().map(|s| s.iter().copied().collect()).unwrap_or_default();
    let inputs = session.inputs().iter().map(|i| (i.name().to_string(), dims(i.dtype()))).collect();
    let outputs = session.outputs().iter().map(|o| (o.name().to_string(), dims(o.dtype()))).collect();
    let meta = session.metadata().map_err(|e| format!("reading metadata: {e}"))?;
    let mut metadata = HashMap::new();
    for key in meta.custom_keys().map_err(|e| format!("reading metadata keys: {e}"))? {
        if let Some(v) = meta.custom(&key) {
            metadata.insert(key, v);
        }
    }
    Ok(ModelIo { inputs, outputs, metadata })
}

impl Backend for OrtBackend {
    fn io(&self) -> &ModelIo {
        &self.io
    }

    fn run(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Vec<OutTensor>, String> {
        let name = self.io.inputs.first().map(|(n, _)| n.as_str()).unwrap_or("input");
        let tensor = Tensor::from_array((shape, input)).map_err(|e| format!("input tensor: {e}"))?;
        // A free session (the batcher runs at most `parallel_runs` at once).
        let mut session = match self.sessions.iter().find_map(|m| m.try_lock().ok()) {
            Some(s) => s,
            None => self.sessions[0].lock().map_err(|_| "session lock poisoned".to_string())?,
        };
        let outputs = session.run(ort::inputs![name => tensor]).map_err(|e| format!("inference failed: {e}"))?;
        let mut out = Vec::with_capacity(outputs.len());
        for (i, (oname, _)) in self.io.outputs.iter().enumerate() {
            let v = &outputs[i];
            let (shape, data): (Vec<i64>, Vec<f32>) = if let Ok((s, d)) = v.try_extract_tensor::<f32>() {
                (s.iter().copied().collect(), d.to_vec())
            } else if let Ok((s, d)) = v.try_extract_tensor::<i64>() {
                (s.iter().copied().collect(), d.iter().map(|&x| x as f32).collect())
            } else if let Ok((s, d)) = v.try_extract_tensor::<i32>() {
                (s.iter().copied().collect(), d.iter().map(|&x| x as f32).collect())
            } else {
                return Err(format!("output {oname:?} is not a float32, int64 or int32 tensor"));
            };
            out.push(OutTensor { name: oname.clone(), shape, data });
        }
        Ok(out)
    }

    fn max_batch(&self) -> usize {
        match self.io.inputs.first().and_then(|(_, s)| s.first()) {
            Some(d) if *d < 0 => usize::MAX,
            _ => 1,
        }
    }

    fn parallel_runs(&self) -> usize {
        self.sessions.len()
    }

    fn device(&self) -> &'static str {
        self.device
    }
}

#[cfg(feature = "tract")]
mod tract_backend {
    use std::collections::HashMap;

    use tract_linalg::multithread::Executor;
    use tract_onnx::pb;
    use tract_onnx::prelude::*;

    use super::{Backend, ModelIo, OutTensor};

    type Plan = Arc<TypedRunnableModel>;

    /// tract runs one page per call: the batch axis is fixed to 1 when the
    /// plan is optimised for the model's input size. tract parallelises only
    /// matrix products inside a run, which leaves depthwise convolutions and
    /// the rest on one core; `threads` pages run side by side instead, each
    /// on one thread (the plan is shared, every run has its own state).
    pub struct TractBackend {
        plan: Plan,
        io: ModelIo,
        threads: usize,
    }

    fn dims(v: &pb::ValueInfoProto) -> Vec<i64> {
        use pb::tensor_shape_proto::dimension::Value as D;
        let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            return Vec::new();
        };
        t.shape
            .as_ref()
            .map(|s| s.dim.iter().map(|d| if let Some(D::DimValue(n)) = d.value { n } else { -1 }).collect())
            .unwrap_or_default()
    }

    /// The model as tract reads it, and its declared interface.
    fn read(model: &str, weights: &[u8]) -> Result<(InferenceModel, ModelIo), String> {
        let fail = |what: &str, e: TractError| format!("model {model}: tract {what}: {e:#}");
        let onnx = tract_onnx::onnx();
        let proto = onnx.proto_model_for_read(&mut &weights[..]).map_err(|e| fail("cannot read it", e))?;
        let graph = proto.graph.as_ref().ok_or_else(|| format!("model {model}: the ONNX file has no graph"))?;
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let io = ModelIo {
            inputs: graph
                .input
                .iter()
                .filter(|i| !initializers.contains(i.name.as_str()))
                .map(|i| (i.name.clone(), dims(i)))
                .collect(),
            outputs: graph.output.iter().map(|o| (o.name.clone(), dims(o))).collect(),
            metadata: proto.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect::<HashMap<_, _>>(),
        };
        let inference = onnx.model_for_proto_model(&proto).map_err(|e| fail("cannot translate it", e))?;
        Ok((inference, io))
    }

    /// `inference` planned for one input shape, single-threaded.
    fn plan(model: &str, inference: InferenceModel, index: usize, shape: &[usize]) -> Result<Plan, String> {
        let fail = |what: &str, e: TractError| format!("model {model}: tract {what}: {e:#}");
        let options = RunOptions { executor: Some(Executor::SingleThread), ..Default::default() };
        inference
            .with_input_fact(index, f32::fact(shape).into())
            .map_err(|e| fail("input shape", e))?
            .into_optimized()
            .map_err(|e| fail("cannot optimise it", e))?
            .into_runnable_with_options(&options)
            .map_err(|e| fail("cannot plan it", e))
    }

    fn to_out(io: &ModelIo, outputs: TVec<TValue>) -> Result<Vec<OutTensor>, String> {
        outputs
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let name = io.outputs.get(i).map(|(n, _)| n.clone()).unwrap_or_else(|| format!("output{i}"));
                let t = v.cast_to::<f32>().map_err(|e| format!("output {name:?}: {e}"))?;
                let data: Vec<f32> = t
                    .to_plain_array_view::<f32>()
                    .map_err(|e| format!("output {name:?}: {e}"))?
                    .iter()
                    .copied()
                    .collect();
                Ok(OutTensor { name, shape: t.shape().iter().map(|&d| d as i64).collect(), data })
            })
            .collect()
    }

    impl TractBackend {
        pub fn load(threads: usize, model: &str, weights: &[u8], input: (&str, u32, u32)) -> Result<Self, String> {
            let (inference, io) = read(model, weights)?;
            let (name, w, h) = input;
            let index = io.inputs.iter().position(|(n, _)| n == name).unwrap_or(0);
            let plan = plan(model, inference, index, &[1, 3, h as usize, w as usize])?;
            Ok(TractBackend { plan, io, threads: threads.max(1) })
        }
    }

    /// Most input shapes a [`TractShapes`] keeps planned.
    const PLANS_KEPT: usize = 24;

    /// tract for a model whose input shape changes from run to run: tract
    /// cannot plan the PP-OCR models with symbolic sizes ("Impossible to
    /// unify" in the detector's upsampling, "shape input is variable" in
    /// the recogniser's reshapes), so each shape gets its own plan (0.1 to
    /// 0.2 s to make), the last [`PLANS_KEPT`] kept.
    pub struct TractShapes {
        model: String,
        inference: InferenceModel,
        io: ModelIo,
        plans: std::sync::Mutex<Vec<([usize; 4], Plan)>>,
    }

    impl TractShapes {
        pub fn load(model: &str, weights: &[u8]) -> Result<Self, String> {
            let (inference, io) = read(model, weights)?;
            Ok(TractShapes { model: model.to_string(), inference, io, plans: Default::default() })
        }

        fn plan_for(&self, shape: [usize; 4]) -> Result<Plan, String> {
            let mut plans = self.plans.lock().map_err(|_| "plan cache lock poisoned".to_string())?;
            if let Some(i) = plans.iter().position(|(s, _)| *s == shape) {
                let hit = plans.remove(i);
                let plan = hit.1.clone();
                plans.push(hit);
                return Ok(plan);
            }
            let plan = plan(&self.model, self.inference.clone(), 0, &shape)?;
            if plans.len() >= PLANS_KEPT {
                plans.remove(0);
            }
            plans.push((shape, plan.clone()));
            Ok(plan)
        }
    }

    impl Backend for TractShapes {
        fn io(&self) -> &ModelIo {
            &self.io
        }

        fn run(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Vec<OutTensor>, String> {
            let plan = self.plan_for(shape)?;
            let tensor = Tensor::from_shape(&shape, &input).map_err(|e| format!("input tensor: {e}"))?;
            let outputs = plan.run(tvec!(tensor.into())).map_err(|e| format!("inference failed: {e:#}"))?;
            to_out(&self.io, outputs)
        }

        fn max_batch(&self) -> usize {
            usize::MAX
        }

        fn device(&self) -> &'static str {
            "cpu"
        }
    }

    impl Backend for TractBackend {
        fn io(&self) -> &ModelIo {
            &self.io
        }

        fn run(&self, input: Vec<f32>, shape: [usize; 4]) -> Result<Vec<OutTensor>, String> {
            let tensor = Tensor::from_shape(&shape, &input).map_err(|e| format!("input tensor: {e}"))?;
            let outputs = self.plan.run(tvec!(tensor.into())).map_err(|e| format!("inference failed: {e:#}"))?;
            to_out(&self.io, outputs)
        }

        fn max_batch(&self) -> usize {
            1
        }

        fn parallel_runs(&self) -> usize {
            self.threads
        }

        fn device(&self) -> &'static str {
            "cpu"
        }
    }
}
