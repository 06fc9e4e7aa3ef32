//! JNI entry points of the Kotlin class `dev.sprig.Native` (android/sprig/src/main/kotlin/dev/sprig/Sprig.kt).
//! Handles are the same registry ids as the C ABI's, carried as `Long`; every failure becomes a thrown
//! `dev.sprig.SprigException(code, message)`, and a panic becomes one too (never an abort of the JVM).

use jni::objects::{JClass, JFloatArray, JIntArray, JObject, JObjectArray, JString, JValue};
use jni::sys::{jdouble, jint, jlong, jlongArray, jobject, jstring};
use sprig_engine::{ContextPolicy, DeviceChoice};
use jni::JNIEnv;

use crate::core::{self, FfiError, FfiResult, Input, LoadRequest, Sampling, SprigStatus};

const EXCEPTION: &str = "dev/sprig/SprigException";

fn throw(env: &mut JNIEnv, e: &FfiError) {
    // A Java exception already pending (e.g. thrown by the token callback) wins.
    if env.exception_check().unwrap_or(true) {
        return;
    }
    let (Ok(msg), Ok(status)) = (env.new_string(&e.message), env.new_string(e.status.name())) else { return };
    // The status travels by name (Kotlin's `SprigStatus.valueOf`) with its C number, never by ordinal.
    let args = [JValue::Int(e.status as jint), JValue::Object(&status), JValue::Object(&msg)];
    if let Ok(obj) = env.new_object(EXCEPTION, "(ILjava/lang/String;Ljava/lang/String;)V", &args) {
        let _ = env.throw(jni::objects::JThrowable::from(obj));
    }
}

/// Runs `f`; an error or a panic is thrown as SprigException and `failed` returned to the JVM.
fn entry<'l, T>(env: &mut JNIEnv<'l>, failed: T, f: impl FnOnce(&mut JNIEnv<'l>) -> FfiResult<T>) -> T {
    match core::guard(|| f(env)) {
        Ok(v) => v,
        Err(e) => {
            throw(env, &e);
            failed
        }
    }
}

fn string(env: &mut JNIEnv, s: &JString, what: &str) -> FfiResult<String> {
    if s.is_null() {
        return Err(FfiError::arg(format!("{what} is null")));
    }
    env.get_string(s).map(Into::into).map_err(|e| FfiError::arg(format!("{what}: {e}")))
}

/// Figures as a Java `long[]` (saturated at `Long.MAX_VALUE`).
fn long_array(env: &mut JNIEnv, v: &[u64]) -> FfiResult<jlongArray> {
    let v: Vec<i64> = v.iter().map(|&x| x.min(i64::MAX as u64) as i64).collect();
    let arr = env.new_long_array(v.len() as i32).map_err(internal)?;
    env.set_long_array_region(&arr, 0, &v).map_err(internal)?;
    Ok(arr.into_raw())
}

fn id(h: jlong) -> u64 {
    h as u64
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_version<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>) -> jstring {
    entry(&mut env, std::ptr::null_mut(), |env| {
        let s = env.new_string(env!("CARGO_PKG_VERSION")).map_err(internal)?;
        Ok(s.into_raw())
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_modelLoad<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    path: JString<'l>,
    tokenizer: JString<'l>,
    threads: jint,
    device: JString<'l>,
    context_length: jint,
    memory_budget_mb: jint,
    prefix_cache_mb: jint,
    context_policy: JString<'l>,
    kv_type: JString<'l>,
) -> jlong {
    entry(&mut env, 0, |env| {
        let path = string(env, &path, "path")?;
        let device = device_by_name(&string(env, &device, "device")?)?;
        let tokenizer = if tokenizer.is_null() { None } else { Some(string(env, &tokenizer, "tokenizerPath")?) };
        if threads < 0 || context_length < 0 || memory_budget_mb < 0 || prefix_cache_mb < 0 {
            return Err(FfiError::arg("threads, contextLength, memoryBudgetMb and prefixCacheMb must be ≥ 0"));
        }
        // Kotlin's `ContextPolicy` names.
        let policy_name = string(env, &context_policy, "contextPolicy")?;
        let context_policy = ContextPolicy::parse(&policy_name.to_lowercase().replace('_', "-"))
            .ok_or_else(|| FfiError::arg(format!("context policy `{policy_name}` is unknown")))?;
        // Kotlin's `KvType` names.
        let kv_name = string(env, &kv_type, "kvType")?;
        let kv_dtype = sprig_backend::KvDtype::parse(&kv_name.to_lowercase())
            .ok_or_else(|| FfiError::arg(format!("KV type `{kv_name}` is unknown")))?;
        let req = LoadRequest {
            path: &path,
            tokenizer: tokenizer.as_deref(),
            threads: threads as u32,
            device,
            context_length: context_length as u32,
            memory_budget_mb: memory_budget_mb as u32,
            prefix_cache_mb: prefix_cache_mb as u32,
            context_policy,
            kv_dtype,
        };
        Ok(core::load_model(&req)? as jlong)
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_modelFree<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) {
    entry(&mut env, (), |_| core::free_model(id(h)))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_modelContextLength<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
) -> jint {
    entry(&mut env, 0, |_| Ok(core::model(id(h))?.context_length as jint))
}

/// Kotlin's `Device` enum names.
fn device_by_name(name: &str) -> FfiResult<DeviceChoice> {
    match name {
        "CPU" => Ok(DeviceChoice::Cpu),
        "GPU" => Ok(DeviceChoice::Gpu),
        "AUTO" => Ok(DeviceChoice::Auto),
        other => Err(FfiError::arg(format!("device `{other}` is not CPU, GPU or AUTO"))),
    }
}

fn device_name(d: DeviceChoice) -> &'static str {
    match d {
        DeviceChoice::Cpu => "CPU",
        DeviceChoice::Gpu => "GPU",
        DeviceChoice::Auto => "AUTO",
    }
}

fn internal(e: jni::errors::Error) -> FfiError {
    FfiError::new(SprigStatus::Internal, e.to_string())
}

/// The model's prefix cache counters: requests, prompt, cached, shared tokens, blocks, bytes, budget, evicted.
#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_modelPrefixCacheStats<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
) -> jlongArray {
    entry(&mut env, std::ptr::null_mut(), |env| {
        let s = core::prefix_cache_stats(id(h))?;
        long_array(env, &[s.requests, s.prompt_tokens, s.cached_tokens, s.shared_tokens, s.blocks as u64, s.bytes as u64, s.budget as u64, s.evicted_blocks])
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_modelShrinkPrefixCache<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    bytes: jlong,
) {
    entry(&mut env, (), |_| core::shrink_prefix_cache(id(h), bytes.max(0) as u64))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionTrim<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) -> jlong {
    entry(&mut env, 0, |_| core::trim_session(id(h)).map(|b| b.min(i64::MAX as u64) as jlong))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_modelDevice<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) -> jstring {
    entry(&mut env, std::ptr::null_mut(), |env| {
        let d = core::model_device(id(h))?;
        Ok(env.new_string(device_name(d)).map_err(internal)?.into_raw())
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionNew<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    model: jlong,
) -> jlong {
    entry(&mut env, 0, |_| Ok(core::new_session(id(model))? as jlong))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionFree<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) {
    entry(&mut env, (), |_| core::free_session(id(h)))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionSetSpeculation<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    drafter: jint,
    draft_model: jlong,
    mode: JString<'l>,
    max_draft: jint,
) {
    entry(&mut env, (), |env| {
        // By name, as every enum crosses JNI: `SpecMode.AUTO` / `ON`.
        let mode = match string(env, &mode, "mode")?.as_str() {
            "AUTO" => crate::SPRIG_SPEC_MODE_AUTO,
            "ON" => crate::SPRIG_SPEC_MODE_ON,
            m => return Err(FfiError::arg(format!("unknown speculation mode {m}"))),
        };
        // `drafter`: a SPRIG_SPEC_* value (Kotlin's `Speculation` picks it).
        let draft = (draft_model != 0).then(|| id(draft_model));
        core::set_speculation(id(h), drafter.max(0) as u32, draft, mode, max_draft.max(0) as u32)
    })
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_sprig_Native_sessionSetEscalation<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    url: JString<'l>,
    model: JString<'l>,
    api_key: JString<'l>,
    policy: JString<'l>,
    threshold: f32,
    window: jint,
    timeout_ms: jint,
) {
    entry(&mut env, (), |env| {
        if url.is_null() {
            return core::set_escalation(id(h), None);
        }
        let url = string(env, &url, "url")?;
        let model = string(env, &model, "model")?;
        let key = if api_key.is_null() { None } else { Some(string(env, &api_key, "apiKey")?) };
        // By name: `EscalationPolicy.NEVER` / `THRESHOLD` / `ALWAYS`.
        let name = string(env, &policy, "policy")?.to_ascii_lowercase();
        let esc = core::escalation(&url, &model, key, &name, threshold, i64::from(window), i64::from(timeout_ms))?;
        core::set_escalation(id(h), Some(esc))
    })
}

/// `[drafted, accepted, passes, pass tokens, switched off (0/1)]`.
#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionSpeculationStats<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
) -> jlongArray {
    entry(&mut env, std::ptr::null_mut(), |env| {
        let s = core::speculation_stats(id(h))?;
        long_array(env, &[s.drafted, s.accepted, s.passes, s.spec_tokens, u64::from(s.switched_off)])
    })
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionReset<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) {
    entry(&mut env, (), |_| core::reset(id(h)))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionSave<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    path: JString<'l>,
) {
    entry(&mut env, (), |env| core::save_session(id(h), &string(env, &path, "path")?))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionLoad<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    path: JString<'l>,
) {
    entry(&mut env, (), |env| core::load_session(id(h), &string(env, &path, "path")?))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionCancel<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) {
    entry(&mut env, (), |_| core::cancel(id(h)))
}

/// Reads a Kotlin `SamplingParams` by its fields' names (plus the bias and stop lists, passed as arrays).
fn sampling_params(
    env: &mut JNIEnv,
    params: &JObject,
    bias_tokens: &JIntArray,
    bias_values: &JFloatArray,
    stop: &JObjectArray,
) -> FfiResult<Sampling> {
    if params.is_null() || bias_tokens.is_null() || bias_values.is_null() || stop.is_null() {
        return Err(FfiError::arg("sampling parameters are null"));
    }
    let bad = |e: jni::errors::Error| FfiError::arg(format!("SamplingParams: {e}"));
    macro_rules! field {
        ($name:literal, F) => {
            env.get_field(params, $name, "F").and_then(|v| v.f()).map_err(bad)?
        };
        ($name:literal, I) => {
            env.get_field(params, $name, "I").and_then(|v| v.i()).map_err(bad)?
        };
        ($name:literal, J) => {
            env.get_field(params, $name, "J").and_then(|v| v.j()).map_err(bad)?
        };
        ($name:literal, Z) => {
            env.get_field(params, $name, "Z").and_then(|v| v.z()).map_err(bad)?
        };
    }
    let (top_k, penalty_last_n, max_tokens) = (field!("topK", I), field!("penaltyLastN", I), field!("maxTokens", I));
    if top_k < 0 || penalty_last_n < 0 || max_tokens < 0 {
        return Err(FfiError::arg("topK, penaltyLastN and maxTokens must be ≥ 0"));
    }
    let n = env.get_array_length(bias_tokens).map_err(bad)?;
    if n != env.get_array_length(bias_values).map_err(bad)? {
        return Err(FfiError::arg("logit bias tokens and values differ in length"));
    }
    let (mut tokens, mut values) = (vec![0; n as usize], vec![0.0; n as usize]);
    env.get_int_array_region(bias_tokens, 0, &mut tokens).map_err(bad)?;
    env.get_float_array_region(bias_values, 0, &mut values).map_err(bad)?;
    if let Some(t) = tokens.iter().find(|&&t| t < 0) {
        return Err(FfiError::arg(format!("logit bias token {t} is negative")));
    }
    let mut stops = Vec::new();
    for i in 0..env.get_array_length(stop).map_err(bad)? {
        let s = JString::from(env.get_object_array_element(stop, i).map_err(bad)?);
        stops.push(string(env, &s, &format!("stop[{i}]"))?);
    }
    let sampling = sprig_engine::SamplingParams {
        temperature: field!("temperature", F),
        top_k: top_k as usize,
        top_p: field!("topP", F),
        min_p: field!("minP", F),
        typical_p: field!("typicalP", F),
        repeat_penalty: field!("repeatPenalty", F),
        presence_penalty: field!("presencePenalty", F),
        frequency_penalty: field!("frequencyPenalty", F),
        penalty_last_n: penalty_last_n as usize,
        logit_bias: tokens.iter().zip(&values).map(|(&t, &b)| (t as u32, b)).collect(),
        stop: stops,
        seed: field!("seed", J) as u64,
        constraint: None,
        top_logprobs: None,
    };
    // The constraint and tools: nullable String fields, at most one constraint.
    let mut text = |name: &str| -> FfiResult<Option<String>> {
        let v = env.get_field(params, name, "Ljava/lang/String;").and_then(|v| v.l()).map_err(bad)?;
        if v.is_null() {
            return Ok(None);
        }
        string(env, &JString::from(v), name).map(Some)
    };
    let (schema, regex, grammar, tools) = (text("jsonSchema")?, text("regex")?, text("grammar")?, text("tools")?);
    let choice = text("toolChoice")?.unwrap_or_else(|| "auto".into());
    let json_object = field!("jsonObject", Z);
    let mut constraints = [
        schema.map(sprig_engine::Constraint::JsonSchema),
        regex.map(sprig_engine::Constraint::Regex),
        grammar.map(sprig_engine::Constraint::Lark),
        json_object.then_some(sprig_engine::Constraint::JsonObject),
    ]
    .into_iter()
    .flatten();
    let constraint = constraints.next();
    if constraints.next().is_some() {
        return Err(FfiError::arg("at most one of jsonSchema, regex, grammar and jsonObject may be set"));
    }
    let tools = match tools {
        Some(t) => Some(core::tools(&t, &choice, field!("constrainTools", Z))?),
        None => None,
    };
    let params = sprig_engine::SamplingParams { constraint, ..sampling };
    Ok(Sampling { params, max_tokens: max_tokens as u32, parse_special: field!("parseSpecial", Z), tools })
}

/// One engine default by its name (Kotlin's `SamplingParams()` defaults read these).
#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_samplingDefault<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    name: JString<'l>,
) -> jdouble {
    entry(&mut env, 0.0, |env| {
        let d = sprig_engine::SamplingParams::default();
        Ok(match string(env, &name, "name")?.as_str() {
            "temperature" => d.temperature as f64,
            "topK" => d.top_k as f64,
            "topP" => d.top_p as f64,
            "minP" => d.min_p as f64,
            "typicalP" => d.typical_p as f64,
            "repeatPenalty" => d.repeat_penalty as f64,
            "presencePenalty" => d.presence_penalty as f64,
            "frequencyPenalty" => d.frequency_penalty as f64,
            "penaltyLastN" => d.penalty_last_n as f64,
            "seed" => d.seed as f64,
            "maxTokens" => sprig_engine::sampler::DEFAULT_MAX_TOKENS as f64,
            other => return Err(FfiError::arg(format!("no sampling default named `{other}`"))),
        })
    })
}

fn generate<'l>(env: &mut JNIEnv<'l>, h: jlong, input: Input, p: Sampling, callback: &JObject<'l>) -> FfiResult<jobject> {
    if callback.is_null() {
        return Err(FfiError::arg("callback is null"));
    }
    let r = core::generate(id(h), input, &p, |text| {
        let Ok(s) = env.new_string(text) else { return false };
        let keep = env
            .call_method(callback, "onToken", "(Ljava/lang/String;)Z", &[JValue::Object(&s)])
            .and_then(|v| v.z())
            .unwrap_or(false); // the callback threw: stop; its exception stays pending for the caller
        let _ = env.delete_local_ref(s);
        keep
    })?;
    // A GenerationResult built here, its stop reason looked up by name: no ordinals cross the boundary.
    let name = env.new_string(core::stop_reason(r.stop).1).map_err(internal)?;
    let reason = env
        .call_static_method(
            "dev/sprig/StopReason",
            "valueOf",
            "(Ljava/lang/String;)Ldev/sprig/StopReason;",
            &[JValue::Object(&name)],
        )
        .and_then(|v| v.l())
        .map_err(internal)?;
    // The tool calls as three parallel String arrays (ids, names, arguments).
    let mut columns = Vec::with_capacity(3);
    let picks: [fn(&sprig_engine::ToolCall) -> &str; 3] = [|c| &c.id, |c| &c.name, |c| &c.arguments];
    for pick in picks {
        let arr = env.new_object_array(r.tool_calls.len() as jint, "java/lang/String", JObject::null()).map_err(internal)?;
        for (i, c) in r.tool_calls.iter().enumerate() {
            let s = env.new_string(pick(c)).map_err(internal)?;
            env.set_object_array_element(&arr, i as jint, &s).map_err(internal)?;
            let _ = env.delete_local_ref(s);
        }
        columns.push(arr);
    }
    let answered = env
        .new_string(match r.answered_by {
            sprig_engine::escalate::AnsweredBy::Student => "LOCAL",
            sprig_engine::escalate::AnsweredBy::Teacher => "TEACHER",
            sprig_engine::escalate::AnsweredBy::StudentAfterTeacherFailed => "LOCAL_AFTER_TEACHER_FAILED",
        })
        .map_err(internal)?;
    let failure = env.new_string(core::escalation_reason(id(h)).unwrap_or_default()).map_err(internal)?;
    let args = [
        JValue::Object(&reason),
        JValue::Int(r.prompt_tokens as jint),
        JValue::Int(r.generated_tokens as jint),
        JValue::Int(r.cached_tokens as jint),
        JValue::Int(r.prefix_cache_tokens as jint),
        JValue::Int(r.context_dropped as jint),
        JValue::Object(&columns[0]),
        JValue::Object(&columns[1]),
        JValue::Object(&columns[2]),
        JValue::Int(r.batched_steps as jint),
        JValue::Object(&answered),
        JValue::Float(r.escalation_signal.unwrap_or(f32::NAN)),
        JValue::Object(&failure),
    ];
    let obj = env
        .new_object(
            "dev/sprig/GenerationResult",
            "(Ldev/sprig/StopReason;IIIII[Ljava/lang/String;[Ljava/lang/String;[Ljava/lang/String;ILjava/lang/String;FLjava/lang/String;)V",
            &args,
        )
        .map_err(internal)?;
    Ok(obj.into_raw())
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_sprig_Native_sessionGenerate<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    prompt: JString<'l>,
    params: JObject<'l>,
    bias_tokens: JIntArray<'l>,
    bias_values: JFloatArray<'l>,
    stop: JObjectArray<'l>,
    callback: JObject<'l>,
) -> jobject {
    entry(&mut env, std::ptr::null_mut(), |env| {
        let prompt = string(env, &prompt, "prompt")?;
        let p = sampling_params(env, &params, &bias_tokens, &bias_values, &stop)?;
        generate(env, h, Input::Text(&prompt), p, &callback)
    })
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_sprig_Native_sessionChat<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    roles: JObjectArray<'l>,
    contents: JObjectArray<'l>,
    names: JObjectArray<'l>,
    call_message: JIntArray<'l>,
    call_ids: JObjectArray<'l>,
    call_names: JObjectArray<'l>,
    call_arguments: JObjectArray<'l>,
    params: JObject<'l>,
    bias_tokens: JIntArray<'l>,
    bias_values: JFloatArray<'l>,
    stop: JObjectArray<'l>,
    callback: JObject<'l>,
) -> jobject {
    entry(&mut env, std::ptr::null_mut(), |env| {
        let arrays = [&roles, &contents, &names, &call_ids, &call_names, &call_arguments];
        if arrays.iter().any(|a| a.is_null()) || call_message.is_null() {
            return Err(FfiError::arg("messages are null"));
        }
        let bad = |e: jni::errors::Error| FfiError::arg(e.to_string());
        let n = env.get_array_length(&roles).map_err(bad)?;
        if n != env.get_array_length(&contents).map_err(bad)? || n != env.get_array_length(&names).map_err(bad)? {
            return Err(FfiError::arg("roles, contents and names differ in length"));
        }
        let mut messages = Vec::with_capacity(n as usize);
        for i in 0..n {
            let r = JString::from(env.get_object_array_element(&roles, i).map_err(bad)?);
            let c = JString::from(env.get_object_array_element(&contents, i).map_err(bad)?);
            let mut m = sprig_engine::ChatMessage::new(
                &string(env, &r, &format!("messages[{i}].role"))?,
                &string(env, &c, &format!("messages[{i}].content"))?,
            );
            let name = env.get_object_array_element(&names, i).map_err(bad)?;
            if !name.is_null() {
                m.name = Some(string(env, &JString::from(name), &format!("messages[{i}].name"))?);
            }
            messages.push(m);
        }
        // Tool calls of assistant turns, flattened: the message each belongs to, and its fields.
        let k = env.get_array_length(&call_message).map_err(bad)?;
        for a in [&call_ids, &call_names, &call_arguments] {
            if env.get_array_length(a).map_err(bad)? != k {
                return Err(FfiError::arg("tool call arrays differ in length"));
            }
        }
        let mut owner = vec![0; k as usize];
        env.get_int_array_region(&call_message, 0, &mut owner).map_err(bad)?;
        for (j, &m) in owner.iter().enumerate() {
            let msg = usize::try_from(m).ok().filter(|&m| m < messages.len());
            let msg = msg.ok_or_else(|| FfiError::arg(format!("tool call {j} names message {m} of {n}")))?;
            let mut field = |a: &JObjectArray, what: &str| -> FfiResult<String> {
                let s = JString::from(env.get_object_array_element(a, j as jint).map_err(bad)?);
                string(env, &s, &format!("toolCalls[{j}].{what}"))
            };
            let (id, name, arguments) = (field(&call_ids, "id")?, field(&call_names, "name")?, field(&call_arguments, "arguments")?);
            messages[msg].tool_calls.push(sprig_engine::ToolCall { id, name, arguments });
        }
        let mut p = sampling_params(env, &params, &bias_tokens, &bias_values, &stop)?;
        p.parse_special = false;
        generate(env, h, Input::Chat(messages), p, &callback)
    })
}
