//! Loading a GGUF model with llama.cpp, and what the HTTP layer needs from it (tokenizing,
//! rendering chats).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

use crate::chat_template::{ChatMessage, ChatTemplate, RenderError, SelectTemplateError};

/// Why the model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadModelError {
    /// The default model is not installed.
    #[error(
        "no model given and the default model is not installed at {0}; install it with \
         `scripts/install-model.sh --dest {dir}` (packaged: /usr/share/ringside/install-model.sh), \
         or pass a GGUF file: ringside-engine serve MODEL.gguf",
        dir = .0.parent().unwrap_or(Path::new(".")).display()
    )]
    DefaultModelMissing(PathBuf),
    /// Neither `RINGSIDE_CACHE_DIR` nor `HOME` is set, so there is no default model path.
    #[error("no model given and neither RINGSIDE_CACHE_DIR nor HOME is set")]
    NoCacheDir,
    /// The model file does not exist or cannot be read.
    #[error("model file {path} cannot be read: {source}")]
    Unreadable {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// llama.cpp's backend failed to initialise.
    #[error("llama.cpp backend initialisation failed: {0}")]
    Backend(#[source] llama_cpp_2::LlamaCppError),
    /// llama.cpp could not load the file.
    #[error("llama.cpp could not load {path}: {source}")]
    Load {
        /// The path.
        path: PathBuf,
        /// llama.cpp's error.
        source: llama_cpp_2::LlamaModelLoadError,
    },
    /// The chat template override is unusable.
    #[error(transparent)]
    Template(#[from] SelectTemplateError),
}

/// Why a prompt could not be turned into tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The chat template failed.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// A token id is outside the vocabulary.
    #[error("token id {id} at prompt[{index}] is outside the vocabulary (0..{n_vocab})")]
    TokenOutOfRange {
        /// Position in the prompt.
        index: usize,
        /// The id.
        id: i64,
        /// Vocabulary size.
        n_vocab: i32,
    },
}

/// A loaded model, shared between the HTTP layer (tokenizing) and the inference thread.
#[derive(Debug)]
pub struct Model {
    /// llama.cpp's model (thread-safe for tokenizing and metadata).
    pub llama: LlamaModel,
    /// Chat template in use.
    pub template: ChatTemplate,
    /// Path of the GGUF file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
}

/// The llama.cpp backend and the model; the backend must outlive every model and context.
#[derive(Debug)]
pub struct Loaded {
    /// Keeps llama.cpp initialised.
    pub backend: LlamaBackend,
    /// The model.
    pub model: Arc<Model>,
}

/// Resolves MODEL: the given path, or the default model in the cache directory.
///
/// # Errors
/// [`LoadModelError::DefaultModelMissing`] / [`LoadModelError::NoCacheDir`] without MODEL.
pub fn resolve_model_path(given: Option<&Path>) -> Result<PathBuf, LoadModelError> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => {
            let path = crate::cli::default_model_path().ok_or(LoadModelError::NoCacheDir)?;
            if path.is_file() {
                Ok(path)
            } else {
                Err(LoadModelError::DefaultModelMissing(path))
            }
        }
    }
}

/// Loads the model (minutes for big files; seconds for the default one).
///
/// # Errors
/// See [`LoadModelError`].
pub fn load(
    path: &Path,
    n_gpu_layers: u32,
    chat_template: Option<&str>,
) -> Result<Loaded, LoadModelError> {
    std::fs::File::open(path).map_err(|source| LoadModelError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mut backend = LlamaBackend::init().map_err(LoadModelError::Backend)?;
    if !tracing::enabled!(tracing::Level::DEBUG) {
        backend.void_logs();
    }
    let params = LlamaModelParams::default().with_n_gpu_layers(n_gpu_layers);
    let llama = LlamaModel::load_from_file(&backend, path, &params).map_err(|source| {
        LoadModelError::Load {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let template = ChatTemplate::select(&llama, chat_template)?;
    let architecture = llama
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    Ok(Loaded {
        backend,
        model: Arc::new(Model {
            llama,
            template,
            path: path.to_path_buf(),
            architecture,
        }),
    })
}

impl Model {
    /// Tokens of a chat, rendered with the chat template (BOS added as the model wants).
    ///
    /// # Errors
    /// [`TokenizeError::Render`] when the template fails.
    pub fn tokenize_chat(
        &self,
        messages: &[ChatMessage],
    ) -> Result<Vec<LlamaToken>, TokenizeError> {
        let prompt = self.template.render(&self.llama, messages)?;
        Ok(self.llama.vocab().tokenize(prompt.as_bytes(), true, true))
    }

    /// Tokens of a completion prompt (BOS added as the model wants; special tokens parsed).
    #[must_use]
    pub fn tokenize_text(&self, text: &str) -> Vec<LlamaToken> {
        self.llama.vocab().tokenize(text.as_bytes(), true, true)
    }

    /// Checks caller-supplied token ids against the vocabulary.
    ///
    /// # Errors
    /// [`TokenizeError::TokenOutOfRange`] for the first bad id.
    pub fn checked_tokens(&self, ids: &[i64]) -> Result<Vec<LlamaToken>, TokenizeError> {
        let n_vocab = self.llama.n_vocab();
        ids.iter()
            .enumerate()
            .map(|(index, &id)| {
                i32::try_from(id)
                    .ok()
                    .filter(|t| (0..n_vocab).contains(t))
                    .map(LlamaToken::new)
                    .ok_or(TokenizeError::TokenOutOfRange { index, id, n_vocab })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_default_model_error_names_install_model_with_its_directory() {
        let e = LoadModelError::DefaultModelMissing(PathBuf::from(
            "/var/lib/ringside/models/gemma-3-270m-q4_k_m.gguf",
        ));
        assert!(
            e.to_string()
                .contains("`scripts/install-model.sh --dest /var/lib/ringside/models`"),
            "{e}"
        );
    }
}
