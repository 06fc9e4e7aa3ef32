// The sprig Android library (AAR) and a sample app. Native code comes from the Rust workspace one level up,
// built by cargo-ndk (see sprig/build.gradle.kts and README.md).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "sprig-android"
include(":sprig", ":sample")
