//! JNI entry points of the Kotlin class `dev.sprig.Native` (android/sprig/src/main/kotlin/dev/sprig/Sprig.kt).
//! Handles are the same registry ids as the C ABI's, carried as `Long`; every failure becomes a thrown
//! `dev.sprig.SprigException(code, message)`, and a panic becomes one too (never an abort of the JVM).

use jni::objects::{JClass, JObject, JObjectArray, JString, JValue};
use jni::sys::{jboolean, jfloat, jint, jintArray, jlong, jstring};
use jni::JNIEnv;

use crate::core::{self, FfiError, FfiResult, Input, LoadRequest, Sampling, SprigStatus};

const EXCEPTION: &str = "dev/sprig/SprigException";

fn throw(env: &mut JNIEnv, e: &FfiError) {
    // A Java exception already pending (e.g. thrown by the token callback) wins.
    if env.exception_check().unwrap_or(true) {
        return;
    }
    let Ok(msg) = env.new_string(&e.message) else { return };
    let args = [JValue::Int(e.status as jint), JValue::Object(&msg)];
    if let Ok(obj) = env.new_object(EXCEPTION, "(ILjava/lang/String;)V", &args) {
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

fn id(h: jlong) -> u64 {
    h as u64
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_version<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>) -> jstring {
    entry(&mut env, std::ptr::null_mut(), |env| {
        let s = env
            .new_string(env!("CARGO_PKG_VERSION"))
            .map_err(|e| FfiError::new(SprigStatus::Internal, e.to_string()))?;
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
    device: jint,
    context_length: jint,
) -> jlong {
    entry(&mut env, 0, |env| {
        let path = string(env, &path, "path")?;
        let tokenizer = if tokenizer.is_null() { None } else { Some(string(env, &tokenizer, "tokenizerPath")?) };
        if threads < 0 || context_length < 0 {
            return Err(FfiError::arg("threads and contextLength must be ≥ 0"));
        }
        let req = LoadRequest {
            path: &path,
            tokenizer: tokenizer.as_deref(),
            threads: threads as u32,
            device: device as u32,
            context_length: context_length as u32,
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

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_modelDevice<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) -> jint {
    entry(&mut env, 0, |_| Ok(core::model_device(id(h))? as jint))
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
pub extern "system" fn Java_dev_sprig_Native_sessionReset<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) {
    entry(&mut env, (), |_| core::reset(id(h)))
}

#[no_mangle]
pub extern "system" fn Java_dev_sprig_Native_sessionCancel<'l>(mut env: JNIEnv<'l>, _c: JClass<'l>, h: jlong) {
    entry(&mut env, (), |_| core::cancel(id(h)))
}

#[allow(clippy::too_many_arguments)]
fn generate<'l>(
    env: &mut JNIEnv<'l>,
    h: jlong,
    input: Input,
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    seed: jlong,
    max_tokens: jint,
    parse_special: bool,
    callback: &JObject<'l>,
) -> FfiResult<jintArray> {
    if top_k < 0 || max_tokens < 0 {
        return Err(FfiError::arg("topK and maxTokens must be ≥ 0"));
    }
    if callback.is_null() {
        return Err(FfiError::arg("callback is null"));
    }
    let p = Sampling {
        temperature,
        top_k: top_k as u32,
        top_p,
        seed: seed as u64,
        max_tokens: max_tokens as u32,
        parse_special,
    };
    let r = core::generate(id(h), input, &p, |text| {
        let Ok(s) = env.new_string(text) else { return false };
        let keep = env
            .call_method(callback, "onToken", "(Ljava/lang/String;)Z", &[JValue::Object(&s)])
            .and_then(|v| v.z())
            .unwrap_or(false); // the callback threw: stop; its exception stays pending for the caller
        let _ = env.delete_local_ref(s);
        keep
    })?;
    let internal = |e: jni::errors::Error| FfiError::new(SprigStatus::Internal, e.to_string());
    let arr = env.new_int_array(3).map_err(internal)?;
    let v = [r.stop_reason as jint, r.prompt_tokens as jint, r.generated_tokens as jint];
    env.set_int_array_region(&arr, 0, &v).map_err(internal)?;
    Ok(arr.into_raw())
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_sprig_Native_sessionGenerate<'l>(
    mut env: JNIEnv<'l>,
    _c: JClass<'l>,
    h: jlong,
    prompt: JString<'l>,
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    seed: jlong,
    max_tokens: jint,
    parse_special: jboolean,
    callback: JObject<'l>,
) -> jintArray {
    entry(&mut env, std::ptr::null_mut(), |env| {
        let prompt = string(env, &prompt, "prompt")?;
        let special = parse_special != 0;
        generate(env, h, Input::Text(&prompt), temperature, top_k, top_p, seed, max_tokens, special, &callback)
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
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    seed: jlong,
    max_tokens: jint,
    callback: JObject<'l>,
) -> jintArray {
    entry(&mut env, std::ptr::null_mut(), |env| {
        if roles.is_null() || contents.is_null() {
            return Err(FfiError::arg("messages are null"));
        }
        let bad = |e: jni::errors::Error| FfiError::arg(e.to_string());
        let n = env.get_array_length(&roles).map_err(bad)?;
        if n != env.get_array_length(&contents).map_err(bad)? {
            return Err(FfiError::arg("roles and contents differ in length"));
        }
        let mut messages = Vec::with_capacity(n as usize);
        for i in 0..n {
            let r = JString::from(env.get_object_array_element(&roles, i).map_err(bad)?);
            let c = JString::from(env.get_object_array_element(&contents, i).map_err(bad)?);
            messages.push(sprig_engine::ChatMessage::new(
                &string(env, &r, &format!("messages[{i}].role"))?,
                &string(env, &c, &format!("messages[{i}].content"))?,
            ));
        }
        generate(env, h, Input::Chat(messages), temperature, top_k, top_p, seed, max_tokens, false, &callback)
    })
}
