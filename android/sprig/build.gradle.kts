plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.sprig"
    compileSdk = 35
    defaultConfig {
        minSdk = 26
        consumerProguardFiles("consumer-rules.pro")
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    // libsprig.so per ABI, written by the cargoNdk task below.
    sourceSets["main"].jniLibs.srcDir("src/main/jniLibs")
    packaging { jniLibs { useLegacyPackaging = false } }
}

dependencies {
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
}

// Builds libsprig.so for arm64-v8a and x86_64 with cargo-ndk (`cargo install cargo-ndk`, `rustup target add
// aarch64-linux-android x86_64-linux-android`, ANDROID_NDK_HOME set). The 16 KB page alignment that Android 15+
// requires comes from the repository's .cargo/config.toml (`-z max-page-size=16384` for the Android targets).
val cargoNdk by tasks.registering(Exec::class) {
    group = "build"
    description = "Builds the native library with cargo-ndk"
    workingDir = rootProject.projectDir.parentFile
    commandLine(
        "cargo", "ndk", "-t", "arm64-v8a", "-t", "x86_64", "--platform", "26",
        "-o", project.file("src/main/jniLibs").absolutePath,
        "build", "--release", "-p", "sprig-ffi"
    )
}
tasks.named("preBuild") { dependsOn(cargoNdk) }
