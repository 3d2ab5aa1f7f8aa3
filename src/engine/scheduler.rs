//! The scheduling loop of one job run.
//!
//! The loop keeps one slot per stage (pending, running, done). Whenever a stage finishes it looks for pending
//! stages whose needs are all done and decides, in this order: the trigger (run or skip), the checkpoint
//! (restore instead of running when no need ran afresh and the output files still exist), the `if`
//! expression (run or skip). Stages that run are spawned as tasks; each task renders `with`, runs attempts
//! with a timeout and retries, and fans out over `for_each` items. A stage's output is checkpointed before it
//! is marked done, so dependents only ever start after the checkpoint exists.
//!
//! A failing stage (without `on_failure = "continue"`), the job's cancellation and the deadline all fire the
//! same `stop` token: running stages are cancelled and nothing new starts.
//!
//! Every task belongs to the run: stage tasks live in a `JoinSet`, attempts and the progress emitter behind
//! abort-on-drop handles, and drop guards cancel the tokens, so dropping the run future stops all of it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{Engine, EngineError, JobFailure, JobReport, JobStatus, StageReport, StageStatus, failure};
use crate::error::ErrorCode;
use crate::job::checkpoint::Checkpoints;
use crate::job::progress::{self, ProgressReporter, ProgressSink, Tracker};
use crate::job::{JobSpec, StageError, StageOutput};
use crate::metrics;
use crate::pipeline::{OnFailure, Pipeline, StageSpec, Trigger};
use crate::retry;
use crate::stage::{Stage, StageContext, WorkDir};
use crate::template::Renderer;
use crate::units::HumanDuration;

/// How long a cancelled attempt may take to clean up (kill its processes) before its task is aborted.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Runs one job; see the module documentation.
pub(super) async fn run(
    engine: &Engine,
    pipeline: &Pipeline,
    job: JobSpec,
    sink: Arc<dyn ProgressSink>,
    cancel: CancellationToken,
    kept: Option<Arc<WorkDir>>,
) -> Result<JobReport, EngineError> {
    engine.check(pipeline)?;
    let saved = engine.checkpoints.load(&job.id).await?;
    // A directory the caller keeps (a worker keeps one while a retry of the job may come back to it) is used as
    // it is; otherwise the run has its own, made when a stage first asks for it and removed when the run ends.
    let path = kept.unwrap_or_else(|| Arc::new(WorkDir::new(&engine.settings.work_root, &job.id)));
    let tracker = Arc::new(Tracker::new(pipeline.stages.iter().map(|stage| (stage.id.clone(), stage.weight))));
    // Everything the run starts is tied to it: if the run future is dropped (its caller aborted), the guards
    // stop the emitter, cancel every stage's token and abort every task, so nothing goes on without a job.
    let done = CancellationToken::new();
    let _done_on_drop = done.clone().drop_guard();
    let emitter = AbortOnDropHandle::new(tokio::spawn(progress::emit(
        tracker.clone(),
        sink,
        job.id.clone(),
        engine.settings.progress_interval,
        done.clone(),
    )));

    let mut run = Run {
        engine,
        pipeline,
        job: Arc::new(job),
        saved,
        work_dir: path.clone(),
        tracker: tracker.clone(),
        stop: cancel.child_token(),
        slots: pipeline.stages.iter().map(|_| Slot::Pending).collect(),
        position: pipeline.stages.iter().enumerate().map(|(index, stage)| (stage.id.clone(), index)).collect(),
        outputs: HashMap::new(),
        permits: Arc::new(Semaphore::new(engine.settings.max_parallel_stages.max(1))),
        failure: None,
        tasks: JoinSet::new(),
        task_stage: HashMap::new(),
        durations: HashMap::new(),
    };
    let _stop_on_drop = run.stop.clone().drop_guard();
    let status = run.drive(&cancel).await;
    match (&status, &run.failure) {
        (JobStatus::Succeeded, _) => tracker.complete("completed"),
        (JobStatus::Cancelled, _) => tracker.say("", "cancelled".into()),
        (JobStatus::Failed, Some(failure)) => {
            tracker.say(failure.stage.as_deref().unwrap_or_default(), format!("failed: {}", failure.message))
        }
        (JobStatus::Failed, None) => tracker.say("", "failed".into()),
    }
    done.cancel();
    // The emitter only awaits the sink; if it panicked there is nothing left to report.
    let _ = emitter.await;
    let report = run.report(status);
    // The run's handle on the work directory went with it; this last one removes the directory (if a stage made
    // it) unless the caller keeps a handle for a retry.
    drop(path);
    Ok(report)
}

/// What the loop knows about one stage.
#[derive(Debug)]
enum Slot {
    Pending,
    Running,
    /// `fresh` is true when the stage ran (or failed) in this run, so its dependents must not be restored.
    Done {
        report: StageReport,
        fresh: bool,
    },
}

/// What a stage task hands back.
struct Finished {
    index: usize,
    result: Result<StageOutput, StageError>,
    attempts: u32,
    elapsed: Duration,
}

struct Run<'a> {
    engine: &'a Engine,
    pipeline: &'a Pipeline,
    job: Arc<JobSpec>,
    saved: HashMap<String, StageOutput>,
    work_dir: Arc<WorkDir>,
    tracker: Arc<Tracker>,
    stop: CancellationToken,
    slots: Vec<Slot>,
    /// Stage id to its index in `slots`.
    position: HashMap<String, usize>,
    outputs: HashMap<String, Value>,
    permits: Arc<Semaphore>,
    failure: Option<JobFailure>,
    tasks: JoinSet<Finished>,
    task_stage: HashMap<tokio::task::Id, usize>,
    /// How long each stage that ran took, from its first attempt's start to its end.
    durations: HashMap<usize, Duration>,
}

impl Run<'_> {
    async fn drive(&mut self, cancel: &CancellationToken) -> JobStatus {
        let timeout = self.engine.settings.job_timeout;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut expired = false;
        loop {
            if !self.stop.is_cancelled() {
                self.launch_ready();
            }
            if self.tasks.is_empty() {
                break;
            }
            tokio::select! {
                () = cancel.cancelled(), if !self.stop.is_cancelled() => self.stop.cancel(),
                () = &mut deadline, if !expired => {
                    expired = true;
                    self.failure.get_or_insert(JobFailure {
                        stage: None,
                        message: format!("job exceeded its deadline of {}", HumanDuration(timeout)),
                        retryable: false,
                        code: ErrorCode::Deadline,
                    });
                    self.stop.cancel();
                }
                Some(joined) = self.tasks.join_next_with_id() => self.finish(joined).await,
            }
        }
        if cancel.is_cancelled() {
            JobStatus::Cancelled
        } else if self.failure.is_some() {
            JobStatus::Failed
        } else {
            JobStatus::Succeeded
        }
    }

    /// Decides every pending stage whose needs are done, repeatedly, since skips and restores free others.
    fn launch_ready(&mut self) {
        loop {
            let ready: Vec<usize> = (0..self.slots.len())
                .filter(|&index| matches!(self.slots[index], Slot::Pending))
                .filter(|&index| self.pipeline.stages[index].needs.iter().all(|need| self.is_done(need)))
                .collect();
            if ready.is_empty() || self.stop.is_cancelled() {
                return;
            }
            for index in ready {
                if !self.stop.is_cancelled() {
                    self.decide(index);
                }
            }
        }
    }

    fn slot_of(&self, id: &str) -> Option<&Slot> {
        self.position.get(id).map(|&index| &self.slots[index])
    }

    fn is_done(&self, id: &str) -> bool {
        matches!(self.slot_of(id), Some(Slot::Done { .. }))
    }

    fn decide(&mut self, index: usize) {
        let spec = &self.pipeline.stages[index];
        let needs: Vec<(StageStatus, bool)> = spec
            .needs
            .iter()
            .filter_map(|need| match self.slot_of(need) {
                Some(Slot::Done { report, fresh }) => Some((report.status, *fresh)),
                _ => None,
            })
            .collect();
        let succeeded = |status: &StageStatus| matches!(status, StageStatus::Succeeded | StageStatus::Restored);
        let failed = |status: &StageStatus| matches!(status, StageStatus::Failed | StageStatus::Cancelled);
        let runs = match spec.trigger {
            Trigger::AllSuccess => needs.iter().all(|(status, _)| succeeded(status)),
            Trigger::NoneFailed => !needs.iter().any(|(status, _)| failed(status)),
            Trigger::AllDone => true,
        };
        if !runs {
            let trigger = serde_json::to_value(spec.trigger).unwrap_or_default();
            let reason = format!("trigger {trigger} not met by its needs");
            return self.settle(index, StageStatus::Skipped, None, Some(reason), false, 0);
        }
        if let Some(saved) = self.saved.get(&spec.id)
            && needs.iter().all(|(_, fresh)| !fresh)
            && saved.files.iter().all(|file| file.exists())
        {
            let value = saved.value.clone();
            self.outputs.insert(spec.id.clone(), value.clone());
            return self.settle(index, StageStatus::Restored, Some(value), None, false, 0);
        }
        let inputs = self.inputs(spec);
        if let Some(condition) = &spec.condition {
            let context = minijinja::Value::from_serialize(json!({ "job": &*self.job, "stages": &inputs }));
            let location = format!("stages.{}.if", spec.id);
            match self.engine.renderer.evaluate(condition, &context, &location) {
                Ok(value) if !value.is_true() => {
                    let reason = format!("`if = \"{condition}\"` was false");
                    return self.settle(index, StageStatus::Skipped, None, Some(reason), false, 0);
                }
                Ok(_) => {}
                Err(error) => {
                    return self.fail(index, StageError::permanent(ErrorCode::Template, error.to_string()), 0);
                }
            }
        }
        let Some(stage) = self.engine.registry.get(&spec.uses) else {
            // `check` ran before the job started, so this only happens if the registry changed underneath.
            let error =
                StageError::permanent(ErrorCode::UnknownKind, format!("stage kind `{}` is not available", spec.uses));
            return self.fail(index, error, 0);
        };
        let task = Arc::new(StageTask {
            spec: spec.clone(),
            with: serde_json::to_value(&spec.with).unwrap_or(Value::Null),
            stage,
            job: self.job.clone(),
            inputs: Arc::new(inputs),
            work_dir: self.work_dir.clone(),
            tracker: self.tracker.clone(),
            index,
            stop: self.stop.clone(),
            renderer: self.engine.renderer.clone(),
            checkpoints: self.engine.checkpoints.clone(),
        });
        let permits = self.permits.clone();
        let handle = self.tasks.spawn(async move {
            let permit = tokio::select! {
                permit = permits.acquire_owned() => permit.ok(),
                () = task.stop.cancelled() => None,
            };
            let Some(_permit) = permit else {
                let elapsed = Duration::ZERO;
                return Finished { index: task.index, result: Err(StageError::cancelled()), attempts: 0, elapsed };
            };
            task.tracker.start_stage(task.index);
            let began = std::time::Instant::now();
            let (result, attempts) = task.clone().run().await;
            Finished { index: task.index, result, attempts, elapsed: began.elapsed() }
        });
        self.task_stage.insert(handle.id(), index);
        self.slots[index] = Slot::Running;
    }

    /// Outputs of the stage's ancestors that have one.
    fn inputs(&self, spec: &StageSpec) -> BTreeMap<String, Value> {
        self.pipeline
            .graph
            .ancestors(&spec.id)
            .into_iter()
            .filter_map(|id| self.outputs.get(&id).map(|value| (id, value.clone())))
            .collect()
    }

    async fn finish(&mut self, joined: Result<(tokio::task::Id, Finished), JoinError>) {
        let (index, result, attempts) = match joined {
            Ok((_, finished)) => {
                // A task stopped before its turn made no attempt and has no duration.
                if finished.attempts > 0 {
                    self.durations.insert(finished.index, finished.elapsed);
                    let stage = &self.pipeline.stages[finished.index].id;
                    let succeeded = finished.result.is_ok();
                    metrics::global().stage_finished(&self.pipeline.name, stage, succeeded, finished.elapsed);
                }
                (finished.index, finished.result, finished.attempts)
            }
            Err(error) => {
                let Some(&index) = self.task_stage.get(&error.id()) else { return };
                let message = format!("stage `{}` ended unexpectedly: {error}", self.pipeline.stages[index].id);
                (index, Err(StageError::permanent(ErrorCode::Panic, message)), 0)
            }
        };
        let id = self.pipeline.stages[index].id.clone();
        match result {
            Ok(output) => match self.engine.checkpoints.save(&self.job.id, &id, &output).await {
                Ok(()) => {
                    self.outputs.insert(id, output.value.clone());
                    self.settle(index, StageStatus::Succeeded, Some(output.value), None, true, attempts);
                }
                Err(error) => {
                    self.fail(index, StageError::transient(ErrorCode::Checkpoint, error.to_string()), attempts)
                }
            },
            Err(error) => self.fail(index, error, attempts),
        }
    }

    fn fail(&mut self, index: usize, error: StageError, attempts: u32) {
        let spec = &self.pipeline.stages[index];
        if self.stop.is_cancelled() {
            let reason = Some(error.message);
            return self.settle(index, StageStatus::Cancelled, None, reason, true, attempts);
        }
        if spec.on_failure == OnFailure::Continue {
            tracing::warn!(job = %self.job.id, stage = %spec.id, %error, "stage failed; the job continues");
            return self.settle(index, StageStatus::Failed, None, Some(error.message), true, attempts);
        }
        self.failure.get_or_insert_with(|| failure(Some(&spec.id), &error));
        self.settle(index, StageStatus::Failed, None, Some(error.message), true, attempts);
        self.stop.cancel();
    }

    fn settle(
        &mut self,
        index: usize,
        status: StageStatus,
        output: Option<Value>,
        reason: Option<String>,
        fresh: bool,
        attempts: u32,
    ) {
        if status == StageStatus::Cancelled {
            self.tracker.stop_stage(index, status.name());
        } else {
            self.tracker.finish_stage(index, status.name());
        }
        let duration_ms = self.durations.get(&index).map(|took| u64::try_from(took.as_millis()).unwrap_or(u64::MAX));
        self.slots[index] = Slot::Done { report: StageReport { status, attempts, output, reason, duration_ms }, fresh };
    }

    fn report(self, status: JobStatus) -> JobReport {
        let stages = self
            .pipeline
            .stages
            .iter()
            .zip(self.slots)
            .map(|(spec, slot)| {
                let report = match slot {
                    Slot::Done { report, .. } => report,
                    Slot::Pending | Slot::Running => {
                        let (output, reason, duration_ms) = (None, None, None);
                        StageReport { status: StageStatus::NotRun, attempts: 0, output, reason, duration_ms }
                    }
                };
                (spec.id.clone(), report)
            })
            .collect();
        JobReport {
            job_id: self.job.id.clone(),
            pipeline: self.pipeline.name.clone(),
            status,
            stages,
            failure: self.failure,
        }
    }
}

/// One stage of one job, with everything its attempts need.
struct StageTask {
    spec: StageSpec,
    /// `with` as JSON, still holding its templates.
    with: Value,
    stage: Arc<dyn Stage>,
    job: Arc<JobSpec>,
    inputs: Arc<BTreeMap<String, Value>>,
    work_dir: Arc<WorkDir>,
    tracker: Arc<Tracker>,
    index: usize,
    stop: CancellationToken,
    renderer: Arc<Renderer>,
    checkpoints: Arc<dyn Checkpoints>,
}

impl StageTask {
    fn context(&self) -> Value {
        json!({ "job": &*self.job, "stages": &*self.inputs })
    }

    async fn run(self: Arc<Self>) -> (Result<StageOutput, StageError>, u32) {
        match self.spec.for_each.clone() {
            None => self.attempts(None, self.stop.clone()).await,
            Some(expression) => self.fan_out(&expression).await,
        }
    }

    /// Runs the stage once per item, `max_parallel` at a time, and collects the outputs in item order.
    async fn fan_out(self: Arc<Self>, expression: &str) -> (Result<StageOutput, StageError>, u32) {
        let location = format!("stages.{}.for_each", self.spec.id);
        let context = minijinja::Value::from_serialize(self.context());
        let items = match self.renderer.evaluate_json_async(expression, &context, &location, &self.stop).await {
            None => return (Err(StageError::cancelled()), 0),
            Some(Ok(Value::Array(items))) => items,
            Some(Ok(other)) => {
                let kind = json_type(&other);
                return (
                    Err(StageError::permanent(ErrorCode::ForEach, format!("`{location}` gave {kind}, not a list"))),
                    0,
                );
            }
            Some(Err(error)) => return (Err(StageError::permanent(ErrorCode::Template, error.to_string())), 0),
        };
        let count = items.len();
        self.tracker.set_slots(self.index, count);
        let limit = Arc::new(Semaphore::new(self.spec.max_parallel.max(1) as usize));
        let item_stop = self.stop.child_token();
        let mut running = JoinSet::new();
        for (position, item) in items.into_iter().enumerate() {
            let (task, limit, stop) = (self.clone(), limit.clone(), item_stop.clone());
            running.spawn(async move {
                let permit = tokio::select! {
                    permit = limit.acquire_owned() => permit.ok(),
                    () = stop.cancelled() => None,
                };
                if permit.is_none() {
                    return (position, (Err(StageError::cancelled()), 0));
                }
                (position, task.attempts(Some((position, item)), stop).await)
            });
        }
        let mut outputs: Vec<Option<StageOutput>> = vec![None; count];
        let mut first_error: Option<StageError> = None;
        let mut attempts = 0;
        while let Some(joined) = running.join_next().await {
            match joined {
                Ok((position, (Ok(output), tries))) => {
                    attempts = attempts.max(tries);
                    outputs[position] = Some(output);
                }
                Ok((position, (Err(mut error), tries))) => {
                    attempts = attempts.max(tries);
                    if first_error.is_none() && !error.is_cancelled() {
                        error.message = format!("item {position} of {count}: {}", error.message);
                        first_error = Some(error);
                        item_stop.cancel();
                    }
                }
                Err(error) => {
                    first_error.get_or_insert_with(|| StageError::permanent(ErrorCode::Panic, error.to_string()));
                    item_stop.cancel();
                }
            }
        }
        if let Some(error) = first_error {
            return (Err(error), attempts);
        }
        if self.stop.is_cancelled() {
            return (Err(StageError::cancelled()), attempts);
        }
        let outputs: Vec<StageOutput> = outputs.into_iter().flatten().collect();
        let files = outputs.iter().flat_map(|output| output.files.iter().cloned()).collect();
        let value = Value::Array(outputs.into_iter().map(|output| output.value).collect());
        (Ok(StageOutput { value, files }), attempts)
    }

    /// Attempts the stage (or one item of it) until it succeeds, fails for good, or is stopped.
    async fn attempts(
        &self,
        item: Option<(usize, Value)>,
        stop: CancellationToken,
    ) -> (Result<StageOutput, StageError>, u32) {
        let id = &self.spec.id;
        let mut context = self.context();
        if let Some((position, value)) = &item {
            context["item"] = value.clone();
            context["index"] = json!(position);
        }
        let context = minijinja::Value::from_serialize(&context);
        let slot = item.as_ref().map_or(0, |(position, _)| *position);
        let max_attempts = self.spec.retry.max_attempts.clamp(1, crate::retry::MAX_ATTEMPTS);
        let mut attempt = 1;
        loop {
            let token = stop.child_token();
            let mut ctx = StageContext {
                job: self.job.clone(),
                stage_id: id.clone(),
                params: Value::Null,
                work_dir: self.work_dir.clone(),
                inputs: self.inputs.clone(),
                progress: ProgressReporter::new(self.tracker.clone(), self.index, slot, id),
                cancel: token.clone(),
                attempt,
                item: item.clone(),
                checkpoints: self.checkpoints.clone(),
            };
            let (stage, renderer, with, context) =
                (self.stage.clone(), self.renderer.clone(), self.with.clone(), context.clone());
            let location = format!("stages.{id}.with");
            // If this attempt is dropped (the job was aborted), its token is cancelled and its task aborted,
            // which kills its processes and drops its requests.
            let _cancel_on_drop = token.clone().drop_guard();
            // `with` is rendered inside the attempt, so the stage's timeout and the job's cancellation cover it.
            let mut handle = AbortOnDropHandle::new(tokio::spawn(async move {
                ctx.params = match renderer.render_async(&with, &context, &location, &ctx.cancel).await {
                    None => return Err(StageError::cancelled()),
                    Some(Err(error)) => return Err(StageError::permanent(ErrorCode::Template, error.to_string())),
                    Some(Ok(params)) => params,
                };
                stage.run(ctx).await
            }));
            let result = tokio::select! {
                joined = &mut handle => flatten(joined, id),
                () = tokio::time::sleep(self.spec.timeout) => {
                    token.cancel();
                    settle(handle).await;
                    let timeout = HumanDuration(self.spec.timeout);
                    Err(StageError::transient(ErrorCode::Timeout, format!("stage `{id}` timed out after {timeout}")))
                }
                () = stop.cancelled() => {
                    token.cancel();
                    settle(handle).await;
                    Err(StageError::cancelled())
                }
            };
            match result {
                Ok(output) => return (Ok(output), attempt),
                Err(error) if error.retryable && attempt < max_attempts && !stop.is_cancelled() => {
                    let wait = retry::delay(&self.spec.retry, attempt, &error);
                    tracing::info!(stage = %id, attempt, ?wait, %error, "attempt failed; retrying");
                    metrics::global().stage_retried(&self.job.pipeline, id);
                    let message = format!("attempt {attempt} failed: {error}; retrying in {}", HumanDuration(wait));
                    self.tracker.say(id, message);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => return (Err(StageError::cancelled()), attempt),
                    }
                    attempt += 1;
                }
                Err(error) => return (Err(error), attempt),
            }
        }
    }
}

/// Gives a cancelled attempt time to clean up, then aborts it.
async fn settle(mut handle: AbortOnDropHandle<Result<StageOutput, StageError>>) {
    if tokio::time::timeout(CANCEL_GRACE, &mut handle).await.is_err() {
        handle.abort();
    }
}

/// The attempt's result; a panic inside the stage becomes a permanent error naming the stage.
fn flatten(joined: Result<Result<StageOutput, StageError>, JoinError>, id: &str) -> Result<StageOutput, StageError> {
    match joined {
        Ok(result) => result,
        Err(error) if error.is_panic() => {
            let payload = error.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|text| (*text).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string());
            Err(StageError::permanent(ErrorCode::Panic, format!("stage `{id}` panicked: {message}")))
        }
        Err(_) => Err(StageError::cancelled()),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
