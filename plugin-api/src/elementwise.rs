//! Fused element-wise programs: one pass over the elements, results written in place.
//!
//! An optimizer step is a handful of element-wise ops per parameter (Lion: four products, two
//! sums, a sign, a difference). Composed from op-table calls, every op allocates a tensor the
//! size of the parameter and walks memory once more. A [`Program`] states the whole step
//! instead; [`Tensor::elementwise_update`] hands it to the host with the step's tensors and
//! scalars, and the host evaluates it in one pass over the elements and writes the results into
//! declared tensors — parameters and optimizer state — in place, unrecorded by autograd, as
//! [`Tensor::assign`] does. (On the CPU that is literally one pass; on other devices the host
//! may compose its own ops, with the same results.)
//!
//! Programs are built from [`Expr`]essions over the call's input tensors ([`Expr::input`]),
//! its f64 scalars ([`Expr::scalar`]) and constants, with the usual operators:
//!
//! ```
//! use codex_plugin_api::{Expr, Program, Result, Tensor};
//!
//! /// Lion's step: inputs `[param, grad, exp_avg]`, scalars `[lr, 1 − lr·λ]`,
//! /// targets `[param, exp_avg]`.
//! fn lion(beta1: f64, beta2: f64) -> Program {
//!     let (p, g, m) = (Expr::input(0), Expr::input(1), Expr::input(2));
//!     let (lr, decay) = (Expr::scalar(0), Expr::scalar(1));
//!     let c = &m * beta1 + &g * (1.0 - beta1);
//!     Program::new()
//!         .store(0, p * decay - c.sign() * lr)
//!         .store(1, m * beta2 + g * (1.0 - beta2))
//! }
//!
//! fn step(program: &Program, p: &Tensor, g: &Tensor, m: &Tensor, lr: f64, wd: f64) -> Result<()> {
//!     Tensor::elementwise_update(program, &[p, g, m], &[lr, 1.0 - lr * wd], &[p, m])
//! }
//! ```
//!
//! Build a program once (at `create`) and run it every step with that step's scalars.
//!
//! **Semantics.** Every input is read before any target is written, so an input that is also a
//! target gives its value from before the call. Values are computed in f64 when any tensor
//! operand is f64 and in f32 otherwise (bf16, f16 and integer inputs are widened to it);
//! scalars and constants are converted to that type as a tensor operand would be, and each
//! result is rounded once to its target's dtype. With f32 tensors every instruction is the f32
//! operation candle and the op table perform, so a program gives bit for bit what the same ops
//! composed from op-table calls give, without the intermediate tensors. Shared subexpressions
//! (`c` above, used once; `g`, used twice) are evaluated at each use: an input is loaded again,
//! nothing is allocated.
//!
//! **On the wire** a program is a list of [`ElemInstr`], a stack machine in postfix order.
//! An instruction's `code` is an [`ElemOp`] number rather than an `abi_stable` enum, so that a
//! later minor version of the plugin API can add instructions without changing the layout of
//! any type the op table takes; a host refuses a code it does not know, naming the instruction.

use std::fmt;
use std::ops::{Add, Div, Mul, Neg, Sub};

use abi_stable::StableAbi;

#[cfg(doc)]
use crate::tensor::Tensor;

/// One instruction of a program, as it crosses the ABI. Build programs with [`Program`]; the
/// host decodes and checks every instruction ([`ElemInstr::op`]) before it runs any.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct ElemInstr {
    /// Which instruction: the code of an [`ElemOp`] (0 is never one).
    pub code: u8,
    /// The input, scalar or target number of `Input`, `Scalar` and `Store`; 0 otherwise.
    pub index: u32,
    /// The value of `Const`; 0 otherwise.
    pub value: f64,
}

impl ElemInstr {
    /// The instruction, or `None` for a code this version of the plugin API does not know.
    pub fn op(&self) -> Option<ElemOp> {
        use ElemOp::*;
        Some(match self.code {
            1 => Input(self.index),
            2 => Scalar(self.index),
            3 => Const(self.value),
            4 => Store(self.index),
            10 => Neg,
            11 => Abs,
            12 => Sign,
            13 => Sqr,
            14 => Sqrt,
            15 => Rsqrt,
            16 => Recip,
            17 => Exp,
            18 => Log,
            19 => Tanh,
            30 => Add,
            31 => Sub,
            32 => Mul,
            33 => Div,
            34 => Maximum,
            35 => Minimum,
            40 => Eq,
            41 => Ne,
            42 => Lt,
            43 => Le,
            44 => Gt,
            45 => Ge,
            50 => Clamp,
            51 => Select,
            _ => return None,
        })
    }
}

/// The instruction set of element-wise programs: what one [`ElemInstr`] does to the stack of
/// values of one element.
///
/// Operands are pushed in order and popped in reverse: `a b Sub` computes `a − b`,
/// `x lo hi Clamp` computes `min(max(x, lo), hi)`, `mask a b Select` computes
/// `mask ≠ 0 ? a : b`. Comparisons push 1 where they hold and 0 elsewhere.
#[non_exhaustive]
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum ElemOp {
    /// Push the element of input tensor `i` (an input with one element gives it everywhere).
    Input(u32),
    /// Push scalar `k` of the call.
    Scalar(u32),
    /// Push a constant.
    Const(f64),
    /// Pop a value and write it into target `j`; every target is written exactly once.
    Store(u32),
    /// `−x`.
    Neg,
    /// `|x|`.
    Abs,
    /// −1, 0 or 1 (0 at ±0 and NaN), as the op table's `sign`.
    Sign,
    /// `x²`.
    Sqr,
    /// `√x`.
    Sqrt,
    /// `1/√x`, computed as the reciprocal of the square root.
    Rsqrt,
    /// `1/x`.
    Recip,
    /// `eˣ`.
    Exp,
    /// `ln x`.
    Log,
    /// `tanh x`.
    Tanh,
    /// `a + b`.
    Add,
    /// `a − b`.
    Sub,
    /// `a · b`.
    Mul,
    /// `a / b`.
    Div,
    /// `max(a, b)`, as the op table's `maximum` (`b` where `a < b`, else `a`).
    Maximum,
    /// `min(a, b)`, as the op table's `minimum` (`b` where `a > b`, else `a`).
    Minimum,
    /// `a == b`.
    Eq,
    /// `a != b`.
    Ne,
    /// `a < b`.
    Lt,
    /// `a <= b`.
    Le,
    /// `a > b`.
    Gt,
    /// `a >= b`.
    Ge,
    /// `min(max(x, lo), hi)`, as the op table's `clamp`.
    Clamp,
    /// `mask ≠ 0 ? a : b`.
    Select,
}

impl ElemOp {
    /// The instruction as it crosses the ABI.
    pub fn encode(self) -> ElemInstr {
        use ElemOp::*;
        let (code, index, value) = match self {
            Input(i) => (1, i, 0.0),
            Scalar(k) => (2, k, 0.0),
            Const(v) => (3, 0, v),
            Store(j) => (4, j, 0.0),
            Neg => (10, 0, 0.0),
            Abs => (11, 0, 0.0),
            Sign => (12, 0, 0.0),
            Sqr => (13, 0, 0.0),
            Sqrt => (14, 0, 0.0),
            Rsqrt => (15, 0, 0.0),
            Recip => (16, 0, 0.0),
            Exp => (17, 0, 0.0),
            Log => (18, 0, 0.0),
            Tanh => (19, 0, 0.0),
            Add => (30, 0, 0.0),
            Sub => (31, 0, 0.0),
            Mul => (32, 0, 0.0),
            Div => (33, 0, 0.0),
            Maximum => (34, 0, 0.0),
            Minimum => (35, 0, 0.0),
            Eq => (40, 0, 0.0),
            Ne => (41, 0, 0.0),
            Lt => (42, 0, 0.0),
            Le => (43, 0, 0.0),
            Gt => (44, 0, 0.0),
            Ge => (45, 0, 0.0),
            Clamp => (50, 0, 0.0),
            Select => (51, 0, 0.0),
        };
        ElemInstr { code, index, value }
    }

    /// How many values the instruction pops.
    pub fn pops(self) -> usize {
        use ElemOp::*;
        match self {
            Input(_) | Scalar(_) | Const(_) => 0,
            Store(_) | Neg | Abs | Sign | Sqr | Sqrt | Rsqrt | Recip | Exp | Log | Tanh => 1,
            Add | Sub | Mul | Div | Maximum | Minimum | Eq | Ne | Lt | Le | Gt | Ge => 2,
            Clamp | Select => 3,
        }
    }

    /// How many values the instruction pushes: 0 for `Store`, 1 for every other.
    pub fn pushes(self) -> usize {
        match self {
            ElemOp::Store(_) => 0,
            _ => 1,
        }
    }
}

impl fmt::Display for ElemOp {
    /// Lowercase, as errors name instructions: `input 2`, `const 0.5`, `add`, `clamp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ElemOp::*;
        let name = match self {
            Input(i) => return write!(f, "input {i}"),
            Scalar(k) => return write!(f, "scalar {k}"),
            Const(v) => return write!(f, "const {v}"),
            Store(j) => return write!(f, "store {j}"),
            Neg => "neg",
            Abs => "abs",
            Sign => "sign",
            Sqr => "sqr",
            Sqrt => "sqrt",
            Rsqrt => "rsqrt",
            Recip => "recip",
            Exp => "exp",
            Log => "log",
            Tanh => "tanh",
            Add => "add",
            Sub => "sub",
            Mul => "mul",
            Div => "div",
            Maximum => "maximum",
            Minimum => "minimum",
            Eq => "eq",
            Ne => "ne",
            Lt => "lt",
            Le => "le",
            Gt => "gt",
            Ge => "ge",
            Clamp => "clamp",
            Select => "select",
        };
        f.write_str(name)
    }
}

/// A value computed element by element: an input's element, a scalar, a constant, or an
/// operation on other expressions. Combine expressions with `+`, `-`, `*`, `/`, unary `-` and
/// the methods below; an `f64` operand is a constant. Put them into a [`Program`] with
/// [`Program::store`].
#[derive(Clone, Debug)]
pub struct Expr {
    /// Postfix code that pushes exactly this one value.
    code: Vec<ElemOp>,
}

/// An index as the ABI carries it; one past `u32::MAX` cannot be given to a call, so an index
/// that large is refused by the host like any index without its input.
fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

impl Expr {
    /// The element of input tensor `i` of the call (its only element, for a one-element input).
    pub fn input(i: usize) -> Expr {
        Expr {
            code: vec![ElemOp::Input(index(i))],
        }
    }

    /// Scalar `k` of the call.
    pub fn scalar(k: usize) -> Expr {
        Expr {
            code: vec![ElemOp::Scalar(index(k))],
        }
    }

    /// A constant, part of the program.
    pub fn constant(value: f64) -> Expr {
        Expr {
            code: vec![ElemOp::Const(value)],
        }
    }

    fn apply(mut self, op: ElemOp) -> Expr {
        self.code.push(op);
        self
    }

    /// `self`, then `operands`, then `op`: `op` applied to all of them, in that order.
    fn then<const N: usize>(mut self, operands: [Expr; N], op: ElemOp) -> Expr {
        for e in operands {
            self.code.extend(e.code);
        }
        self.apply(op)
    }

    fn with(self, rhs: impl Into<Expr>, op: ElemOp) -> Expr {
        self.then([rhs.into()], op)
    }

    /// `|x|`.
    pub fn abs(self) -> Expr {
        self.apply(ElemOp::Abs)
    }

    /// −1, 0 or 1 (0 at ±0 and NaN).
    pub fn sign(self) -> Expr {
        self.apply(ElemOp::Sign)
    }

    /// `x²`.
    pub fn sqr(self) -> Expr {
        self.apply(ElemOp::Sqr)
    }

    /// `√x`.
    pub fn sqrt(self) -> Expr {
        self.apply(ElemOp::Sqrt)
    }

    /// `1/√x`.
    pub fn rsqrt(self) -> Expr {
        self.apply(ElemOp::Rsqrt)
    }

    /// `1/x`.
    pub fn recip(self) -> Expr {
        self.apply(ElemOp::Recip)
    }

    /// `eˣ`.
    pub fn exp(self) -> Expr {
        self.apply(ElemOp::Exp)
    }

    /// `ln x`.
    pub fn log(self) -> Expr {
        self.apply(ElemOp::Log)
    }

    /// `tanh x`.
    pub fn tanh(self) -> Expr {
        self.apply(ElemOp::Tanh)
    }

    /// `max(self, rhs)`.
    pub fn maximum(self, rhs: impl Into<Expr>) -> Expr {
        self.with(rhs, ElemOp::Maximum)
    }

    /// `min(self, rhs)`.
    pub fn minimum(self, rhs: impl Into<Expr>) -> Expr {
        self.with(rhs, ElemOp::Minimum)
    }

    /// `min(max(self, lo), hi)`.
    pub fn clamp(self, lo: impl Into<Expr>, hi: impl Into<Expr>) -> Expr {
        self.then([lo.into(), hi.into()], ElemOp::Clamp)
    }

    /// 1 where `self == rhs`, else 0.
    pub fn eq(self, rhs: impl Into<Expr>) -> Expr {
        self.with(rhs, ElemOp::Eq)
    }

    /// 1 where `self != rhs`, else 0.
    pub fn ne(self, rhs: impl Into<Expr>) -> Expr {
        self.with(rhs, ElemOp::Ne)
    }

    /// 1 where `self < rhs`, else 0.
    pub fn lt(self, rhs: impl Into<Expr>) -> Expr {
        self.with(rhs, ElemOp::Lt)
    }

    /// 1 where `self <= rhs`, else 0.
    pub fn le(self, rhs: impl Into<Expr>) -> Expr {
        self.with(rhs, ElemOp::Le)
    }

    /// 1 where `self > rhs`, else 0.
    pub fn gt(self, rhs: impl Into<Expr>) -> Expr {
        self.with(rhs, ElemOp::Gt)
    }

    /// 1 where `self >= rhs`, else 0.
    pub fn ge(self, rhs: impl Into<Expr>) -> Expr {
        self.with(rhs, ElemOp::Ge)
    }

    /// `on_true` where `self` (a mask, such as a comparison) is not 0, else `on_false`.
    pub fn select(self, on_true: impl Into<Expr>, on_false: impl Into<Expr>) -> Expr {
        self.then([on_true.into(), on_false.into()], ElemOp::Select)
    }
}

impl From<f64> for Expr {
    fn from(value: f64) -> Expr {
        Expr::constant(value)
    }
}

impl From<&Expr> for Expr {
    fn from(e: &Expr) -> Expr {
        e.clone()
    }
}

impl Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        self.apply(ElemOp::Neg)
    }
}

impl Neg for &Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        self.clone().apply(ElemOp::Neg)
    }
}

macro_rules! binary_operators {
    ($($trait:ident $method:ident $op:ident),* $(,)?) => {$(
        impl<R: Into<Expr>> $trait<R> for Expr {
            type Output = Expr;
            fn $method(self, rhs: R) -> Expr {
                self.with(rhs, ElemOp::$op)
            }
        }

        impl<R: Into<Expr>> $trait<R> for &Expr {
            type Output = Expr;
            fn $method(self, rhs: R) -> Expr {
                self.clone().with(rhs, ElemOp::$op)
            }
        }

        impl $trait<Expr> for f64 {
            type Output = Expr;
            fn $method(self, rhs: Expr) -> Expr {
                Expr::constant(self).with(rhs, ElemOp::$op)
            }
        }

        impl $trait<&Expr> for f64 {
            type Output = Expr;
            fn $method(self, rhs: &Expr) -> Expr {
                Expr::constant(self).with(rhs, ElemOp::$op)
            }
        }
    )*};
}

binary_operators!(Add add Add, Sub sub Sub, Mul mul Mul, Div div Div);

/// An element-wise update: which value goes into which target of
/// [`Tensor::elementwise_update`]. Plain data: build it once, run it every step.
#[derive(Clone, Debug, Default)]
pub struct Program {
    instrs: Vec<ElemInstr>,
}

impl Program {
    /// A program that writes nothing yet.
    pub fn new() -> Program {
        Program::default()
    }

    /// Also write `value` into target `target` (an index into the call's targets); a constant
    /// fills the target. Every target is written exactly once; the host refuses a program that
    /// misses one or writes one twice.
    pub fn store(mut self, target: usize, value: impl Into<Expr>) -> Program {
        let code = value
            .into()
            .code
            .into_iter()
            .chain([ElemOp::Store(index(target))]);
        self.instrs.extend(code.map(ElemOp::encode));
        self
    }

    /// The instructions, as they cross the ABI: what the op table's `elementwise_update`
    /// receives.
    pub fn instructions(&self) -> &[ElemInstr] {
        &self.instrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program's instructions, decoded and written out, `; ` between them.
    fn listing(p: &Program) -> String {
        p.instructions()
            .iter()
            .map(|i| {
                i.op()
                    .map_or_else(|| format!("?{}", i.code), |op| op.to_string())
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn check(p: Program, expect: &str) {
        assert_eq!(listing(&p), expect);
    }

    #[test]
    fn expressions_compile_to_postfix() {
        let (x, y) = (Expr::input(0), Expr::input(1));
        let s = Expr::scalar(0);
        check(
            Program::new().store(0, &x + &y * 2.0),
            "input 0; input 1; const 2; mul; add; store 0",
        );
        check(
            Program::new().store(1, 1.0 - &x / &s),
            "const 1; input 0; scalar 0; div; sub; store 1",
        );
        check(
            Program::new().store(0, -x.clone().sqrt().rsqrt()),
            "input 0; sqrt; rsqrt; neg; store 0",
        );
        check(
            Program::new().store(0, x.clone().clamp(-1.0, &s)),
            "input 0; const -1; scalar 0; clamp; store 0",
        );
        check(
            Program::new().store(0, x.clone().gt(0.0).select(&y, y.clone().abs())),
            "input 0; const 0; gt; input 1; input 1; abs; select; store 0",
        );
        check(
            Program::new()
                .store(1, x.clone().maximum(&y))
                .store(0, x.minimum(y).sign())
                .store(2, 0.0),
            "input 0; input 1; maximum; store 1; input 0; input 1; minimum; sign; store 0; \
             const 0; store 2",
        );
    }

    #[test]
    fn every_instruction_round_trips_through_its_code() {
        use ElemOp::*;
        let all = [
            Input(3),
            Scalar(7),
            Const(-0.25),
            Store(2),
            Neg,
            Abs,
            Sign,
            Sqr,
            Sqrt,
            Rsqrt,
            Recip,
            Exp,
            Log,
            Tanh,
            Add,
            Sub,
            Mul,
            Div,
            Maximum,
            Minimum,
            Eq,
            Ne,
            Lt,
            Le,
            Gt,
            Ge,
            Clamp,
            Select,
        ];
        let mut codes = std::collections::HashSet::new();
        for op in all {
            let instr = op.encode();
            assert_eq!(instr.op(), Some(op), "{op}");
            assert!(
                codes.insert(instr.code),
                "{op}: code {} is taken",
                instr.code
            );
            assert_eq!(op.pushes(), usize::from(!matches!(op, Store(_))));
        }
        for code in 0..=u8::MAX {
            if !codes.contains(&code) {
                let instr = ElemInstr {
                    code,
                    index: 0,
                    value: 0.0,
                };
                assert_eq!(instr.op(), None, "code {code} decodes");
            }
        }
    }
}
