//! Chat prompt rendering.
//!
//! Models whose GGUF carries `tokenizer.chat_template` use it through llama.cpp's template
//! engine. Files without one (the default Gemma 3 270M among them) get the built-in template of
//! their architecture — rendering them as ChatML, llama-server's fallback, makes Gemma answer with
//! garbage. `--chat-template NAME` overrides the choice: `gemma` and `chatml` are rendered here,
//! any other value is handed to llama.cpp (a built-in template name such as `llama3`, or a
//! template text it recognises).

use std::fmt;

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};

/// A chat role the engine accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `system` (and OpenAI's newer `developer`).
    System,
    /// `user`.
    User,
    /// `assistant`.
    Assistant,
}

impl Role {
    /// Parses an OpenAI role name.
    #[must_use]
    pub fn parse(role: &str) -> Option<Self> {
        match role {
            "system" | "developer" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One chat message with its text content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// The text.
    pub content: String,
}

/// The template the engine renders chats with.
pub enum ChatTemplate {
    /// Gemma: `<start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n`, system folded
    /// into the next user turn.
    Gemma,
    /// ChatML: `<|im_start|>role\n…<|im_end|>\n`.
    ChatMl,
    /// A template applied by llama.cpp (the model's own, or one named on the command line).
    Native {
        /// The name or text given to llama.cpp.
        source: String,
        /// The same, as llama.cpp takes it.
        template: LlamaChatTemplate,
    },
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Why a chat template could not be chosen.
#[derive(Debug, thiserror::Error)]
pub enum SelectTemplateError {
    /// The `--chat-template` value contains a NUL byte.
    #[error("--chat-template contains a NUL byte")]
    Nul(#[from] std::ffi::NulError),
}

/// Why a chat could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A message contains a NUL byte, which llama.cpp's template engine cannot take.
    #[error("message content contains a NUL byte")]
    Nul,
    /// llama.cpp rejected the template or the conversation.
    #[error("chat template {template} could not render the conversation: {reason}")]
    Native {
        /// The template's description.
        template: String,
        /// llama.cpp's error.
        reason: String,
    },
}

impl ChatTemplate {
    /// Picks the template: the override, else the model's own, else the architecture's built-in.
    ///
    /// # Errors
    /// [`SelectTemplateError::Nul`] when the override contains a NUL byte.
    pub fn select(
        model: &LlamaModel,
        override_name: Option<&str>,
    ) -> Result<Self, SelectTemplateError> {
        if let Some(name) = override_name {
            return Ok(match name.trim() {
                "gemma" | "gemma3" => Self::Gemma,
                "chatml" => Self::ChatMl,
                other => Self::Native {
                    source: other.to_owned(),
                    template: LlamaChatTemplate::new(other)?,
                },
            });
        }
        if let Ok(template) = model.chat_template(None) {
            let source = template.to_string().unwrap_or_default();
            return Ok(Self::Native { source, template });
        }
        let arch = model
            .meta_val_str("general.architecture")
            .unwrap_or_default();
        Ok(Self::for_architecture(&arch))
    }

    /// The built-in template for a GGUF `general.architecture` value.
    #[must_use]
    pub fn for_architecture(arch: &str) -> Self {
        if arch.starts_with("gemma") {
            Self::Gemma
        } else {
            Self::ChatMl
        }
    }

    /// A short description for logs.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Gemma => "built-in gemma".to_owned(),
            Self::ChatMl => "built-in chatml".to_owned(),
            Self::Native { source, .. } if source.len() <= 40 => format!("llama.cpp {source:?}"),
            Self::Native { .. } => "model's own (llama.cpp)".to_owned(),
        }
    }

    /// Renders `messages` into a prompt that ends with the assistant's turn opened.
    ///
    /// # Errors
    /// See [`RenderError`].
    pub fn render(
        &self,
        model: &LlamaModel,
        messages: &[ChatMessage],
    ) -> Result<String, RenderError> {
        match self {
            Self::Gemma => Ok(render_gemma(messages)),
            Self::ChatMl => Ok(render_chatml(messages)),
            Self::Native { template, .. } => {
                let chat = messages
                    .iter()
                    .map(|m| LlamaChatMessage::new(m.role.as_str().to_owned(), m.content.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| RenderError::Nul)?;
                model
                    .apply_chat_template(template, &chat, true)
                    .map_err(|e| RenderError::Native {
                        template: self.describe(),
                        reason: e.to_string(),
                    })
            }
        }
    }
}

/// Gemma's template, as llama.cpp's built-in `gemma` and Gemma 3's own Jinja template render it:
/// contents trimmed, `assistant` named `model`, system text prepended to the next user turn.
#[must_use]
pub fn render_gemma(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    let mut system = String::new();
    for m in messages {
        let content = m.content.trim();
        match m.role {
            Role::System => {
                if !system.is_empty() {
                    system.push_str("\n\n");
                }
                system.push_str(content);
            }
            Role::User => {
                out.push_str("<start_of_turn>user\n");
                if !system.is_empty() {
                    out.push_str(&system);
                    out.push_str("\n\n");
                    system.clear();
                }
                out.push_str(content);
                out.push_str("<end_of_turn>\n");
            }
            Role::Assistant => {
                out.push_str("<start_of_turn>model\n");
                out.push_str(content);
                out.push_str("<end_of_turn>\n");
            }
        }
    }
    if !system.is_empty() {
        // A system message with no user turn after it still reaches the model.
        out.push_str("<start_of_turn>user\n");
        out.push_str(&system);
        out.push_str("<end_of_turn>\n");
    }
    out.push_str("<start_of_turn>model\n");
    out
}

/// ChatML.
#[must_use]
pub fn render_chatml(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(m.role.as_str());
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_owned(),
        }
    }

    #[test]
    fn gemma_single_user() {
        assert_eq!(
            render_gemma(&[msg(Role::User, " Hi there \n")]),
            "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma_folds_system_and_maps_assistant() {
        let chat = [
            msg(Role::System, "Be brief."),
            msg(Role::User, "Hello"),
            msg(Role::Assistant, "Hi!"),
            msg(Role::User, "Name a colour."),
        ];
        assert_eq!(
            render_gemma(&chat),
            "<start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n\
             <start_of_turn>model\nHi!<end_of_turn>\n\
             <start_of_turn>user\nName a colour.<end_of_turn>\n\
             <start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma_system_only() {
        assert_eq!(
            render_gemma(&[msg(Role::System, "Say hi")]),
            "<start_of_turn>user\nSay hi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn chatml() {
        assert_eq!(
            render_chatml(&[msg(Role::System, "s"), msg(Role::User, "u")]),
            "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn architecture_choice() {
        assert!(matches!(
            ChatTemplate::for_architecture("gemma3"),
            ChatTemplate::Gemma
        ));
        assert!(matches!(
            ChatTemplate::for_architecture("llama"),
            ChatTemplate::ChatMl
        ));
        assert_eq!(Role::parse("developer"), Some(Role::System));
        assert_eq!(Role::parse("tool"), None);
    }
}
