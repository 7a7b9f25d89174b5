"""The phrase lists behind ``lorabook.tasks``: templates per intent, greetings, distractors (chapter 1).

Syntax: ``[a|b|c]`` picks one alternative (an empty one allowed), ``{slot}`` is filled by
``lorabook.tasks`` (amount, account, day, day2, date, year, n, hour, card, phone, email,
postcode, street, sortcode, name, surname, full). Template i of a list is held out for the test
split when i % 4 == 3; keep that in mind when adding lines (append, so ids stay stable).
"""

INTENT_TEMPLATES = {
    "change_payment_date": [
        "[Can|Could] I [change|move] my [monthly |]payment date to the {day}?",
        "I get paid on the {day} now, so I need my [repayment|payment] date moved to match.",
        "please change the due date on {account} to the {day} of each month",
        "Is it possible to switch my [direct debit|payment] date from the {day} to the {day2}?",
        "My {amount} [payment|instalment] comes out on the {day} but that's too early for me, "
        "can it go out later in the month?",
        "[Want|Need] to [change|alter] [when|the day] my loan payment [is taken|comes out] for {account}",
        "new job, paid on the {day}. [can|could] you move my payments to the {day2}?",
        "I'd like my {amount} monthly [payment|instalment] [taken|collected] on the {day} instead.",
        "Requesting a change of payment date for {account}: the {day} would suit me better.",
        "Could the collection date [be pushed back|move] a week? It clashes with my rent on the {day}.",
        "how do i change the date my [loan |]payment goes out",
        "The {day} is a bad date for me. Can we make it the {day2} from next month?",
    ],
    "early_settlement": [
        "I'd like a settlement figure for {account}[ please|].",
        "How much would it cost to pay off my loan [early|in full] [this month|now]?",
        "I want to [clear|settle] the [remaining|outstanding] balance of {amount} [early|in one go].",
        "[Can|Could] you send me an early [settlement|payoff] quote? I've come into some money.",
        "I have {amount} [saved|available] and would like to [pay off|settle] {account} completely.",
        "what's the [payoff|settlement] amount if I [close|finish] the loan by {date}?",
        "Planning to repay everything early - is there a [penalty|fee] for settling {account}?",
        "please let me know the full amount to close my loan, I can pay {amount} straight away",
        "Thinking of settling early. Could you confirm the figure valid until {date}?",
        "I'd like to make a final payment and close {account}.",
        "My [dad|partner] [is going to|will] help me pay off the loan. What's the [total|full] settlement?",
        "Can I pay {amount} to settle the loan in full before {date}?",
    ],
    "hardship": [
        "I've lost my job and can't make my [next|monthly] payment.",
        "I'm struggling [financially|with money], can I [reduce|lower] my payments to {amount} a month?",
        "[Due to|Because of] [illness|a family emergency] I can't afford the repayments on {account}.",
        "Is there any [help|support] available? My hours were cut and I can only [manage|afford] {amount}.",
        "I'm in financial difficulty and need a payment [break|holiday] for {n} months.",
        "Can I [pause|freeze] my payments? [Money is really tight|I'm behind on bills] at the moment.",
        "i cant pay this month, my benefits [were delayed|got stopped]. what [can i do|are my options]",
        "Can someone call me about a [repayment plan|payment arrangement] for {account}, I'm struggling.",
        "My income has dropped [a lot|significantly]; I can pay {amount} per month instead of the full amount.",
        "[Going through|Dealing with] a divorce and can't keep up with [payments|the loan]. Need [help|advice].",
        "Would you accept a reduced payment of {amount} while I'm on [sick leave|maternity leave]?",
        "I'm worried about [falling behind|missing payments] on {account}. What support do you offer?",
    ],
    "balance_enquiry": [
        "What is my [current|outstanding] balance[ please|]?",
        "How much do I still owe on {account}?",
        "Can you tell me [the remaining balance|how much is left to pay] on my loan?",
        "[Quick question|Just checking] - how many payments [are left|do I have left] on {account}?",
        "i'd like to know my balance as of {date}",
        "Could you confirm what's [left|outstanding] on my loan after {n} more payments?",
        "Please send me my [outstanding|remaining] balance for {account}.",
        "How much is [left|remaining] on my loan?",
        "what do i owe [now|at the moment]",
        "Can I check the balance on {account} [online|by text]?",
        "When will my loan be paid off and what's the balance now?",
        "I've lost track of my loan - what's the current amount owed?",
    ],
    "payment_failed": [
        "My payment [didn't go through|failed] this month.",
        "The {amount} payment [bounced|was returned] on {date}, what happens now?",
        "I [missed|forgot] my payment due on the {day}, can I pay it now?",
        "why was my direct debit for {account} [rejected|declined]?",
        "[My bank|The bank] says the payment of {amount} [was declined|didn't clear]. Please advise.",
        "I got a [letter|text] saying I missed a payment on {account} but I [thought I paid|had the money].",
        "Payment failed [again|yesterday] - [can|could] you take it again on the {day}?",
        "I had insufficient funds on {date} so the {amount} didn't go out. How do I catch up?",
        "[Missed|Failed] payment on {account}. Will I be charged?",
        "the [instalment|payment] wasn't collected this month, is my account in arrears now",
        "Can I make up the missed {amount} payment by card?",
        "I've been told my last payment was unsuccessful. What should I do?",
    ],
    "refund_overpayment": [
        "I [think I |]overpaid by {amount}, can I get it [back|refunded]?",
        "I paid {amount} twice by mistake this month. Please refund [one of them|the extra].",
        "[My loan is|The loan was] paid off but you took another payment. I want a refund.",
        "You took {amount} after I settled {account}, please return it.",
        "There's a credit balance of {amount} on my account, how do I [get it back|claim it]?",
        "Please refund the [extra|duplicate] payment taken on {date}.",
        "I sent {amount} to the wrong loan by mistake, can it be refunded?",
        "I was charged twice for the same [instalment|month] on {account}.",
        "Can you [refund|return] the overpayment on {account}?",
        "I paid more than I needed to when I settled - still waiting on my refund of {amount}.",
        "When will I receive the refund for the overpayment I made on {date}?",
        "Double payment taken [yesterday|this week]. I need the {amount} back.",
    ],
    "update_contact_details": [
        "I've moved house, my new address is {street}, {postcode}.",
        "Please update my phone number to {phone}.",
        "New email address: {email}. Please update [my details|your records].",
        "Can you change the [mobile|phone] number on {account} to {phone}?",
        "I [changed|got a new] [number|phone], it's {phone} now",
        "Please [update|change] my postcode to {postcode} for {account}.",
        "I got married and my surname is now {surname}, can you update it?",
        "How do I change my address? I moved on {date}.",
        "Update my contact email to {email} - the old one [no longer works|is closed].",
        "We've relocated to {street}, {postcode}. Please send letters there.",
        "My contact details are out of date, the best number is {phone}.",
        "Please stop using my old address, the new postcode is {postcode}.",
    ],
    "statement_request": [
        "Can I have a statement for {account}[ please|]?",
        "Please send me [a copy of |]my annual statement for {year}.",
        "I need a statement showing all payments since {date} for a [mortgage|rental] application.",
        "Could you email me a full statement of account?",
        "i need proof of my loan payments for the last {n} months",
        "Please post a paper statement to my home address.",
        "Can you send a [statement|breakdown] of interest paid in {year}?",
        "I'd like a [transaction history|payment history] for {account}.",
        "Where can I [download|find] my loan statements?",
        "My accountant needs a statement covering {year}.",
        "Requesting a statement [up to|as at] {date}.",
        "Send me the [latest|most recent] statement please, {account}",
    ],
    "complaint": [
        "I want to make a complaint about [how I was treated|the service] on the phone.",
        "You charged me a {amount} late fee [even though|when] I paid on time. [This is unacceptable|I'm not happy].",
        "I'm [very|really] unhappy with [the way|how] {account} has been handled.",
        "[Formal|Official] complaint: I was [promised|told] a call back on {date} and nobody rang.",
        "Your staff were rude to me [yesterday|last week]. I want to [complain|speak to a manager].",
        "Why have I been charged {amount} in fees? I [want|wish] to complain.",
        "I've been waiting {n} weeks for a reply and I'm fed up.",
        "This is the third time I've had to chase you about {account}. Terrible service.",
        "I want to raise a complaint: interest of {amount} was added [incorrectly|wrongly].",
        "[Absolutely|Really] disappointed with your service. [How do I escalate this|Who do I complain to]?",
        "The letter you sent me was [wrong|full of errors] and caused me a lot of stress.",
        "I'm going to the ombudsman if the {amount} charge isn't [resolved|refunded].",
    ],
    "cancel_direct_debit": [
        "Please cancel my direct debit.",
        "I want to stop the direct debit on {account}.",
        "Can you cancel the DD? I'll pay by card [from now on|instead].",
        "I'm changing banks - cancel the direct debit from sort code {sortcode}.",
        "stop taking payments from my bank account, I['ll| will] set up a standing order",
        "How do I cancel the direct debit for {account}?",
        "Please [cancel|stop] the {amount} monthly direct debit [from next month|going forward].",
        "I no longer want payments collected by direct debit.",
        "Cancel the direct debit mandate on my old [Barclays|Lloyds|Monzo] account please.",
        "Remove the DD from my bank card ending {card}, I've closed that account.",
        "I'd like to switch from direct debit to paying manually each month.",
        "Can the direct debit of {amount} be cancelled after this month's payment?",
    ],
}

# The account reference, LN-<5 digits> canonically, in the forms customers write it.
ACCOUNT_FORMS = (
    "loan LN-{d}", "my loan LN{d}", "account LN-{d}", "loan account {d}", "loan no. {d}",
    "account no. LN {d}", "ref LN{d}", "reference LN-{d}", "agreement {d}", "loan number {d}",
    "acct ln-{d}", "loan #{d}", "LN-{d}", "loan ref ln{d}", "my account (LN {d})", "ln{d}",
)
ACCOUNT_WRAPPERS = (
    "Regarding {account}.", "Re: {account}", "This is about {account}.",
    "I'm writing about {account}.", "[My|The] loan is {account}.", "({account})",
    "[Ref|Reference]: {account}", "{account} -",
)
# A sum of money said in passing, for messages whose core template has none.
AMOUNT_WRAPPERS = (
    "My monthly payment is {amount}.", "I pay {amount} a month[ by direct debit|].",
    "The last payment [was|I made was] {amount}.", "[For info|FYI], my instalment is {amount}.",
)
AMOUNT_WORDS = {
    50: ("fifty pounds", "fifty quid"), 100: ("a hundred pounds", "one hundred pounds"),
    150: ("a hundred and fifty pounds",), 200: ("two hundred pounds", "two hundred quid"),
    250: ("two hundred and fifty pounds",), 300: ("three hundred pounds",),
}
# Numbers that are neither the amount nor the account: phone, dates, card digits, counts.
DISTRACTORS = (
    "You can call me on {phone}.", "My number is {phone} if you need it.",
    "I'm away until {date}.", "I'm at work until {hour}pm.", "I've been with you for {n} years.",
    "Best time to call is after {hour}.", "My card ending {card} is the one on file.",
    "I [called|rang] on {date} but [got no answer|was on hold for ages].",
    "I've [had|held] this loan since {year}.", "I tried the app on {date} but it [crashed|failed].",
)
GREETINGS = (
    "Hi", "Hi,", "Hello,", "Hello there.", "Dear Sir/Madam,", "Good morning,", "Good afternoon.",
    "hey", "To whom it may concern,", "Hiya,",
)
SIGN_OFFS = (
    "Thanks", "Thanks, {name}", "Regards, {full}", "Many thanks", "Cheers", "Kind regards, {name}",
    "Thank you.", "Best, {name}", "ta", "- {name}",
)
URGENCY_CUES = {
    "high": ("This is urgent.", "Please deal with this today.", "URGENT - please reply asap.",
             "I need this sorted immediately.", "Please treat this as urgent!",
             "It's really urgent, please call me back today.", "Need an answer asap please.",
             "Please help, this can't wait."),
    "low": ("No rush.", "No hurry on this one.", "Whenever you get a chance.",
            "Not urgent, just for my records.", "Reply when convenient.", "There's no rush at all.",
            "In your own time, thanks.", "Low priority, just curious."),
}
FIRST_NAMES = ("Sam", "Priya", "Tom", "Aisha", "Gareth", "Mei", "Olu", "Sophie", "Dan", "Fatima",
               "Liam", "Grace", "Raj", "Chloe", "Kwame", "Ellie")
SURNAMES = ("Patel", "Jones", "Smith", "Okafor", "Williams", "Chen", "Murphy", "Khan", "Evans",
            "Taylor", "Nowak", "Brown", "Hughes", "Ali")
STREETS = ("Mill Lane", "Station Road", "Church Street", "Park Avenue", "Victoria Road",
           "Queens Drive", "Oak Close", "High Street")
